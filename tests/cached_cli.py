"""``python tests/cached_cli.py CACHE_FOLDER [asym-export arguments]``: asym-export's ``main()`` in a
process of its own, as ``python -m asym_export.cli`` runs it, with its graph exports served
from an :mod:`onnx_cache` folder. For tests that need a process (exit code, stderr, a kill)
and whose subject comes after ``torch.onnx.export``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnx_cache  # noqa: E402

onnx_cache.install(onnx_cache.OnnxExportCache(Path(sys.argv.pop(1))))

from asym_export.cli import main  # noqa: E402

sys.exit(main())
