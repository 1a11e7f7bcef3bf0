#!/usr/bin/env bash
# The release check (.ci/run calls it): `python -m build` makes an sdist and a wheel; each installs
# into a fresh virtual environment and passes a smoke test there, run outside the source tree:
# `ht --version`, `ht models`, `ht demo --help`, the concept library, `import htcli as ht` with the
# shipped tiny hypernetwork, and one version everywhere.
#
# The fresh environments see the running environment's packages (torch, diffusers...) through a
# .pth line, read after their own site-packages, so that only htcli itself is installed in them:
# nothing is downloaded but the build backend (setuptools, for the isolated build).
# Usage: tests/release_check.sh   (from any environment with the project's dependencies and `build`)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d -t ht-release-XXXXXX)"
trap 'rm -rf "$work"' EXIT
start=$SECONDS

python -m build --outdir "$work/dist" "$root" >"$work/build.log" 2>&1 || { tail -20 "$work/build.log"; exit 1; }
version="$(python -c "import ast, pathlib; print([n.value.value for n in ast.parse(pathlib.Path('$root/htcli/__init__.py').read_text()).body if isinstance(n, ast.Assign) and n.targets[0].id == '__version__'][0])")"
deps="$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"

for artifact in "$work/dist/htcli-$version.tar.gz" "$work/dist/htcli-$version-py3-none-any.whl"; do
    [ -f "$artifact" ] || { echo "release check: $(basename "$artifact") was not built"; ls "$work/dist"; exit 1; }
    env="$work/venv-$(basename "$artifact")"
    python -m venv "$env"
    echo "$deps" >"$("$env/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/ht-deps.pth"
    "$env/bin/python" -m pip install -q --no-deps --ignore-installed "$artifact"  # not "already satisfied" by the running env's htcli
    (
        cd "$work"  # not the source tree: the installed package is what imports
        unset PYTHONPATH
        [ "$("$env/bin/ht" --version)" = "ht $version" ]
        "$env/bin/ht" models >/dev/null
        "$env/bin/ht" demo --help >/dev/null
        "$env/bin/ht" concepts show "art deco" >/dev/null  # the concept library is in the package
        "$env/bin/python" - "$version" <<'EOF'
import sys
from importlib.metadata import version
from pathlib import Path

import htcli as ht

expected = sys.argv[1]
assert Path(ht.__file__).is_relative_to(sys.prefix), f"htcli imported from {ht.__file__}, not the fresh install"
assert ht.__version__ == expected and version("htcli") == expected, (ht.__version__, version("htcli"), expected)
assert ht.HyperTransport.from_pretrained(model="tiny").model == "tiny"  # the shipped weights and configs are in
EOF
    ) || { echo "release check: the smoke test failed for $(basename "$artifact")"; exit 1; }
    echo "release check: $(basename "$artifact") installs and runs"
done
echo "release check: passed in $((SECONDS - start)) s"
