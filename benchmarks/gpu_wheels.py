#!/usr/bin/env python3
"""Fill .whl/ with the wheels the GPU machine needs to run pagecube, for benchmarks/gpu_check.sh.

    .venv/bin/python benchmarks/gpu_wheels.py        (run here, from the repository root, with PyPI reachable)

The GPU machine reaches no package index, and its python3 (3.12, x86-64 Linux)
already holds torch, numpy, xarray, transformers and many more (MACHINE_HAS
below).  This walks pagecube's dependencies (core + the ``base`` extra that
``closure-lite-base`` needs), stops at every package the machine has, and
downloads a cp312 manylinux or pure-Python wheel of each one it lacks, pinned
to the version installed in the environment running this script (the project's
working one), plus a wheel of pagecube itself so the ``pagecube`` command works
there.  Wheels of other versions or of packages no longer needed are removed:
one version of each.  Prints the list, the total size and the working tree's
size (everything that travels must stay under 64 MiB).

There, gpu_check.sh installs them with ``pip install --no-index --no-deps
--target`` and puts that folder first on PYTHONPATH.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parent.parent
LIMIT_MIB = 64  # what travels to the machine, wheels included

# The machine's Python packages (names only), as last listed for it.  Versions
# known from a `pip list` there: numpy 2.5.2, torch 2.11.0,
# transformers 5.17.0, tokenizers 0.23.2, safetensors 0.8.0, huggingface_hub 1.33.0.
MACHINE_HAS = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax
opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3
uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()
EXTRAS = ("base",)  # closure-lite-base: transformers + tokenizers (the machine has both)

# The machine's interpreter, for environment markers and wheel tags.
TARGET_ENV = {
    "python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
    "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
    "platform_machine": "x86_64", "os_name": "posix", "implementation_version": "3.12.3",
}
# Preferred first; the later ones only where a package has no wheel for the first ones.
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64",
             "manylinux_2_35_x86_64"]


def _applies(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**TARGET_ENV, "extra": e}) for e in extras | {""})


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def needed() -> dict[str, tuple[str, str | None]]:
    """{canonical name: (requirement as pagecube's tree states it, version installed here or None)}."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    roots = [Requirement(r) for r in project["dependencies"]]
    for extra in EXTRAS:
        roots += [Requirement(r) for r in project["optional-dependencies"][extra]]
    have = {canonicalize_name(n) for n in MACHINE_HAS}
    out: dict[str, tuple[str, str | None]] = {}
    seen: set[tuple[str, frozenset]] = set()
    todo = [(r, {""}) for r in roots]
    while todo:
        req, parent_extras = todo.pop()
        if not _applies(req, parent_extras):
            continue
        name = canonicalize_name(req.name)
        if name in have:
            continue
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        version = _installed(name)
        if name not in out:
            out[name] = (str(req), version)
        if version is not None and not req.specifier.contains(version, prereleases=True):
            print(f"gpu_wheels: warning: {name} {version} installed here does not satisfy {req}", file=sys.stderr)
        if version is None:
            print(f"gpu_wheels: warning: {name} is not installed here: taking the newest for {req}", file=sys.stderr)
            continue
        for text in metadata.requires(name) or []:
            todo.append((Requirement(text), set(req.extras)))
    return out


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", default=str(ROOT / ".whl"), help="wheel folder (default: .whl at the repository root)")
    args = ap.parse_args()
    dest = Path(args.dest)
    dest.mkdir(exist_ok=True)

    want = needed()
    pins = {name: (f"{name}=={v}" if v else Requirement(spec).name + str(Requirement(spec).specifier))
            for name, (spec, v) in sorted(want.items())}
    # keep what is already here at the wanted version; drop everything else (one version of each)
    for f in dest.glob("*.whl"):
        name, version, *_ = parse_wheel_filename(f.name)
        if name == "pagecube" or name not in want or (want[name][1] and str(version) != want[name][1]):
            f.unlink()
    tags = [a for p in PLATFORMS for a in ("--platform", p)]
    _pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
         *tags, "-d", str(dest), *pins.values())
    _pip("wheel", "-q", "--no-deps", "-w", str(dest), str(ROOT))

    wheels = sorted(dest.glob("*.whl"))
    names = [parse_wheel_filename(f.name)[0] for f in wheels]
    doubles = {n for n in names if names.count(n) > 1}
    missing = set(want) - set(names)
    if doubles or missing:
        print(f"gpu_wheels: wrong set: two versions of {sorted(doubles)}, none of {sorted(missing)}", file=sys.stderr)
        return 1
    total = sum(f.stat().st_size for f in wheels)
    for f in wheels:
        print(f"  {f.stat().st_size / 2**20:6.2f} MiB  {f.name}")
    tree = _tree_bytes()
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB; working tree {tree / 2**20:.1f} MiB; "
          f"together {(total + tree) / 2**20:.1f} of {LIMIT_MIB} MiB")
    return 0 if total + tree < LIMIT_MIB * 2**20 else 1


def _tree_bytes() -> int:
    """Tracked files plus untracked files git does not ignore: what travels besides the wheels."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    return sum((ROOT / p).stat().st_size for p in out.split("\0") if p and (ROOT / p).is_file())


if __name__ == "__main__":
    sys.exit(main())
