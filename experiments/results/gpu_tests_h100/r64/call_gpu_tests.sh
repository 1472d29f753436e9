#!/bin/bash
# R64: two device calls on one H100 at 8ddb51e (35 s and 93 s). The GPU machine's image lacks grain and jupytext
# (the package goes on with --no-deps): `pytest -m gpu tests` must collect there, skipping the modules that need
# them, and the model's and the Triton and decode kernels' GPU tests run. (The Mosaic kernel file's GPU tests
# ran at the 240-register default in R60.)
export JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu_collect.txt
timeout 60 python3 -m pytest -m gpu -q --collect-only tests 2>&1 | tail -4 | tee -a $OUT/gpu_collect.txt
timeout 100 python3 -m pytest -m gpu -q -p no:xdist tests/test_gpu_model.py 2>&1 | tail -3 | tee -a $OUT/gpu_collect.txt
# second call, the same warm machine
timeout 110 python3 -m pytest -m gpu -q -p no:xdist tests/test_selective_decode_kernel.py tests/test_kernels_triton.py \
  tests/test_kernels_triton_segments.py 2>&1 | tail -3 | tee $OUT/gpu_tests_small.txt
