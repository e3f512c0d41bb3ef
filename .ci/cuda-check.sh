#!/usr/bin/env bash
# Compile-checks the CUDA path of mor-kernels on a machine without a GPU.
#
# Steps (each printed as it runs; the script stops at the first failure):
#   1. venv   - install the CUDA 13.5 pip wheels (a full nvcc) into .cuda/ (gitignored).
#   2. ptx    - compile every mor-kernels/kernels/*.cu to PTX with nvcc for compute_80
#               and compute_90, then assemble each PTX with ptxas for sm_80 and sm_90.
#   3. cargo  - `cargo check -p mor-kernels --features cuda --all-targets` with the
#               environment of TOOLCHAIN.md section 4(d). This compiles candle-kernels
#               with nvcc: about 9 minutes on 2 cores when cold. mor-kernels' build.rs
#               compiles the kernels to PTX and embeds them with their inlined sources.
#   4. nvrtc  - compiles the inlined sources that build.rs embedded (the run-time path
#               when the build-time PTX cannot be used) with NVRTC for compute_80 and
#               compute_90, and assembles the PTX with ptxas.
#
# Usage: bash .ci/cuda-check.sh [venv|ptx|cargo|nvrtc|all]   (default: all)
# Environment:
#   MOR_CUDA_VENV        venv folder (default: .cuda)
#   MOR_CUDA_TARGET_DIR  cargo target dir of step 3 (default: target/cuda-check, so the
#                        cuda build neither waits on nor invalidates the default build)
#   MOR_CUDA_OUT         where step 2 writes PTX and cubins (default: target/cuda-ptx)
#
# The script is idempotent: an existing venv with a working nvcc is reused, and outputs
# are overwritten.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

STEP="${1:-all}"
VENV="${MOR_CUDA_VENV:-$ROOT/.cuda}"
TARGET_DIR="${MOR_CUDA_TARGET_DIR:-$ROOT/target/cuda-check}"
PTX_OUT="${MOR_CUDA_OUT:-$ROOT/target/cuda-ptx}"
# Pinned so that every run gets the same toolkit (13.5, PTX ISA 9.5).
WHEELS=(
    "nvidia-cuda-nvcc==13.5.37"
    "nvidia-nvvm==13.5.37"
    "nvidia-cuda-crt==13.5.37"
    "nvidia-cuda-runtime==13.5.37"
    "nvidia-cuda-cccl==13.3.5.0.6"
    "nvidia-cuda-nvrtc==13.5.37"
)

say() { printf '\n[cuda-check] %s\n' "$*"; }
die() { printf '[cuda-check] FAILED: %s\n' "$*" >&2; exit 1; }

# The wheels unpack into site-packages/nvidia/cu13/{bin,include,lib,nvvm}.
cuda_root() {
    local c
    for c in "$VENV"/lib/python3*/site-packages/nvidia/cu13; do
        if [ -x "$c/bin/nvcc" ]; then
            echo "$c"
            return 0
        fi
    done
    return 1
}

step_venv() {
    say "step venv: CUDA 13.5 wheels into $VENV"
    if C="$(cuda_root)" && "$C/bin/nvcc" --version >/dev/null 2>&1 \
        && [ -f "$C/include/nv/target" ] && [ -f "$C/lib/libnvrtc.so.13" ]; then
        say "reusing $C"
    else
        command -v python3 >/dev/null || die "python3 is required"
        [ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV" || die "python3 -m venv $VENV"
        "$VENV/bin/pip" install --quiet "${WHEELS[@]}" || die "pip install ${WHEELS[*]}"
        C="$(cuda_root)" || die "no nvcc under $VENV after installing the wheels"
    fi
    "$C/bin/nvcc" --version | tail -n 2
}

setup_env() {
    C="$(cuda_root)" || die "no nvcc under $VENV: run \`bash .ci/cuda-check.sh venv\` first"
    export PATH="$C/bin:$PATH" CUDA_HOME="$C" CUDA_PATH="$C" CUDA_ROOT="$C"
    # candle-kernels' build asks nvidia-smi for the compute capability unless this is set.
    export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
    # cudarc 0.19.10 knows CUDA only up to 13.4; nvcc 13.5 otherwise makes its build panic.
    export CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13040}"
}

step_ptx() {
    setup_env
    say "step ptx: nvcc -> PTX (compute_80, compute_90) -> ptxas (sm_80, sm_90), into $PTX_OUT"
    mkdir -p "$PTX_OUT"
    local n=0 cu name cc
    shopt -s nullglob
    local sources=(mor-kernels/kernels/*.cu)
    [ "${#sources[@]}" -gt 0 ] || die "no kernels in mor-kernels/kernels/"
    for cu in "${sources[@]}"; do
        name="$(basename "$cu" .cu)"
        for cc in 80 90; do
            echo "  nvcc   $cu -> $name.compute_$cc.ptx"
            nvcc --ptx -std=c++17 -O3 -arch="compute_$cc" -I mor-kernels/kernels \
                -Werror all-warnings \
                "$cu" -o "$PTX_OUT/$name.compute_$cc.ptx" || die "nvcc $cu (compute_$cc)"
            echo "  ptxas  $name.compute_$cc.ptx -> sm_$cc"
            ptxas -arch="sm_$cc" --warn-on-spills "$PTX_OUT/$name.compute_$cc.ptx" \
                -o "$PTX_OUT/$name.sm_$cc.cubin" || die "ptxas $name (sm_$cc)"
            n=$((n + 1))
        done
        # PTX made for compute_80 must also assemble for sm_90 (what a driver JIT does).
        echo "  ptxas  $name.compute_80.ptx -> sm_90"
        ptxas -arch=sm_90 "$PTX_OUT/$name.compute_80.ptx" -o "$PTX_OUT/$name.80on90.cubin" \
            || die "ptxas $name compute_80 PTX for sm_90"
    done
    say "ptx: $n PTX files built and assembled"
}

step_cargo() {
    setup_env
    say "step cargo: cargo check -p mor-kernels --features cuda --all-targets (target dir $TARGET_DIR)"
    local t0=$SECONDS
    CARGO_TARGET_DIR="$TARGET_DIR" cargo check -p mor-kernels --features cuda --all-targets \
        || die "cargo check --features cuda"
    say "cargo: ok in $((SECONDS - t0)) s"
}

step_nvrtc() {
    setup_env
    local out_dir
    # The newest build-script output of mor-kernels in the cuda target dir.
    out_dir="$(ls -td "$TARGET_DIR"/debug/build/mor-kernels-*/out 2>/dev/null | head -n 1)"
    [ -n "$out_dir" ] && [ -f "$out_dir/mor_cuda_modules.rs" ] \
        || die "no mor-kernels build output under $TARGET_DIR: run the cargo step first"
    say "step nvrtc: NVRTC on the embedded sources of $out_dir"
    mkdir -p "$PTX_OUT"
    local arch sm f
    for arch in compute_80 compute_90; do
        "$VENV/bin/python" - "$C/lib/libnvrtc.so.13" "$arch" "$PTX_OUT" "$out_dir"/*.cu <<'PY' \
            || die "NVRTC ($arch)"
import ctypes, pathlib, sys
lib = ctypes.CDLL(sys.argv[1])
arch, out_dir = sys.argv[2], pathlib.Path(sys.argv[3])
ok = True
for src in map(pathlib.Path, sys.argv[4:]):
    prog = ctypes.c_void_p()
    lib.nvrtcCreateProgram(ctypes.byref(prog), src.read_bytes(), src.name.encode(), 0, None, None)
    opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17"]
    code = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    if code != 0 or log.value.strip():
        print(f"  NVRTC {src.name} ({arch}) code {code}:\n{log.value.decode()}")
        ok = False
        continue
    lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
    ptx = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetPTX(prog, ptx)
    (out_dir / f"{src.stem}.nvrtc.{arch}.ptx").write_bytes(ptx.value)
    print(f"  nvrtc  {src.name} -> {src.stem}.nvrtc.{arch}.ptx")
sys.exit(0 if ok else 1)
PY
        sm="sm_${arch#compute_}"
        for f in "$PTX_OUT"/*.nvrtc."$arch".ptx; do
            echo "  ptxas  $(basename "$f") -> $sm"
            ptxas -arch="$sm" "$f" -o "${f%.ptx}.cubin" || die "ptxas $f ($sm)"
        done
    done
    # build.rs must have embedded nvcc PTX for every module (nvcc is on PATH here).
    local n_ptx n_cu
    n_ptx=$(ls "$out_dir"/*.ptx | wc -l)
    n_cu=$(ls "$out_dir"/*.cu | wc -l)
    [ "$n_ptx" -eq "$n_cu" ] || die "build.rs embedded $n_ptx PTX files for $n_cu modules"
    say "nvrtc: $n_cu modules compiled and assembled; build.rs embedded PTX for all of them"
}

case "$STEP" in
    venv) step_venv ;;
    ptx) step_ptx ;;
    cargo) step_cargo ;;
    nvrtc) step_nvrtc ;;
    all) step_venv; step_ptx; step_cargo; step_nvrtc ;;
    *) die "unknown step \`$STEP\` (expected venv, ptx, cargo, nvrtc or all)" ;;
esac
say "done ($STEP)"
