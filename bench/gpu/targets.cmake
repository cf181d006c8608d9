# The GPU benchmark: SD 1.5's U-Net forward + backward on a CUDA device (bench/gpu/check.sh runs it beside PyTorch
# eager). It builds everywhere and says "no CUDA device" where there is none.
add_executable(bench_unet_gpu bench/gpu/bench_unet_gpu.cpp)
target_link_libraries(bench_unet_gpu PRIVATE sdt_models sdt_trainer)
target_precompile_headers(bench_unet_gpu REUSE_FROM sdt_torch)
