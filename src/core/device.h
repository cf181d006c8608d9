// The device a rank computes on (sdt's --device): models, trained weights, optimizer state, batches and communication
// buffers live there. Random numbers are still drawn on the host and copied (see src/train/trainer.cpp), so a run on
// a GPU draws the noise, timesteps and dropout masks a CPU run draws.
#pragma once

#include <string_view>

#include <c10/core/Device.h>

namespace sdt {

// "cpu"; "cuda": the GPU of this process's rank on its node (local_rank), or GPU 0 when CUDA_VISIBLE_DEVICES leaves
// each process one GPU, as Accelerate picks; "auto": cuda when a GPU is visible, else cpu. A CUDA device also becomes
// the process's current device. sdt::Error when cuda is asked for and none is visible, or local_rank has no GPU.
c10::Device select_device(std::string_view flag, int local_rank);

}  // namespace sdt
