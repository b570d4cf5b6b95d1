"""Child process for test_publish.py: publish the files of artifact SRC into OUT through
ArtifactWriter, as an export's last step does, and SIGKILL itself at the KILL_AT-th
file-system change (0: never). Prints the number of changes it made.

The writer and its file-system calls are the real ones; only the expensive part of an
export (making the graphs) is replaced by copying an existing, verified artifact's files.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time

KILL_AT = int(os.environ.get("KILL_AT", "0"))
PAUSE = float(os.environ.get("PAUSE_S", "0"))
count = 0


def _counted(module, name):
    real = getattr(module, name)

    def call(*a, **k):
        global count
        count += 1
        if count == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        if PAUSE:
            time.sleep(PAUSE)  # widen the window a reader may fall into
        return real(*a, **k)

    setattr(module, name, call)


for n in ("rename", "replace", "fsync", "unlink", "rmdir", "mkdir", "chmod", "ftruncate", "pwrite"):
    _counted(os, n)
for n in ("copyfile", "rmtree"):
    _counted(shutil, n)

from asym_export.artifact import ArtifactWriter  # noqa: E402 - after the counters are in place
from asym_runtime.manifest import read_manifest  # noqa: E402

src, out = read_manifest(sys.argv[1]), sys.argv[2]
with ArtifactWriter(out) as w:
    for name, e in src.files.items():
        shutil.copyfile(src.path(name), w.stage_path(name))
        w.publish(name, role=e.role, fmt=e.format, precision=e.precision, data_of=e.data_of)
    fields = {k: v for k, v in src.data.items() if k not in ("schema_version", "generation", "files")}
    fields["created_utc"] = "child"
    w.write_manifest(fields)
print(count)
