"""Let a new virtual environment see the packages of the interpreter that created it (`make setup
VENV_FLAGS=--system-site-packages`).

`python -m venv --system-site-packages` reaches the BASE interpreter's site-packages only. When the creating
interpreter is itself a virtual environment holding the CUDA torch (GPU images often ship one, e.g. a
`python3` that lives in /opt/torch/.venv), that torch stays invisible to the new environment and `make
setup` would install another. This writes `<VENV>/lib/pythonX.Y/site-packages/_inherited_site.pth` listing
the creating environment's site-packages folders, which Python appends to sys.path after the new
environment's own (which keep precedence, so pip installs what is missing into it). Nothing is written when
the creating interpreter is not a virtual environment (--system-site-packages already covers it).

    python scripts/inherit_site_packages.py VENV_DIR     # run with the interpreter that created VENV_DIR
"""
from __future__ import annotations

import site
import subprocess
import sys
from pathlib import Path

PTH_NAME = "_inherited_site.pth"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python scripts/inherit_site_packages.py VENV_DIR")
    venv_python = Path(argv[0]) / "bin" / "python"
    if sys.prefix == sys.base_prefix:
        print(f"{sys.executable} is not a virtual environment: --system-site-packages covers its packages")
        return 0
    folders = [folder for folder in site.getsitepackages() if Path(folder).is_dir()]
    target = subprocess.run([str(venv_python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                            check=True, capture_output=True, text=True).stdout.strip()
    (Path(target) / PTH_NAME).write_text("".join(folder + "\n" for folder in folders))
    print(f"{Path(target) / PTH_NAME}: the packages of {sys.prefix} ({', '.join(folders)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
