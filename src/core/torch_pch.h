// The precompiled header shared by every LibTorch translation unit (CMake: sdt_torch and the
// targets that REUSE_FROM it). Keep it to LibTorch itself: project headers change too often.
#pragma once
#include <torch/torch.h>
