#!/usr/bin/env bash
# Build and install learn2learn 0.2.0 (the reference implementation our MAML tests compare against)
# into the virtual environment of the given Python. PyPI has no wheel for Python 3.11 and the sdist's
# pre-generated Cython C files include a header that Python 3.11 removed, so regenerate them first.
# Usage: .ci/install-learn2learn.sh .venv/bin/python
set -euo pipefail
python="${1:-python}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$python" -m pip download --quiet --no-deps --no-binary :all: learn2learn==0.2.0 -d "$work"
tar xzf "$work"/learn2learn-0.2.0.tar.gz -C "$work"
python3 -m venv "$work/build"
"$work/build/bin/pip" install --quiet cython setuptools wheel
(cd "$work/learn2learn-0.2.0" && rm -f learn2learn/data/*.c && "$work/build/bin/python" setup.py -q build_ext bdist_wheel >/dev/null)
# Runtime dependencies by hand: the wheel also asks for gsutil, which nothing we use needs.
"$python" -m pip install --quiet --no-deps "$work"/learn2learn-0.2.0/dist/learn2learn-*.whl
"$python" -m pip install --quiet gym qpth scipy requests tqdm
"$python" -c "import learn2learn; print('learn2learn', learn2learn.__version__)"
