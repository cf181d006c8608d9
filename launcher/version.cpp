#include "launcher/commands.h"

#include <hdf5.h>
#include <mpi.h>

#include <fmt/format.h>
#include <opencv2/core/version.hpp>
#include <torch/cuda.h>
#include <torch/version.h>

namespace sdt {

std::string version_report() {
  char mpi[MPI_MAX_LIBRARY_VERSION_STRING] = {};
  int mpi_length = 0;
  MPI_Get_library_version(mpi, &mpi_length);  // allowed before MPI_Init
  std::string mpi_line(mpi, static_cast<size_t>(mpi_length));
  mpi_line = mpi_line.substr(0, mpi_line.find_first_of("\r\n,"));
  unsigned h5_major = 0, h5_minor = 0, h5_release = 0;
  H5get_libversion(&h5_major, &h5_minor, &h5_release);
#ifdef SDT_CUDA
  const std::string cuda = torch::cuda::is_available() ? fmt::format("CUDA build, {} device(s) visible", torch::cuda::device_count())
                                                       : "CUDA build, no device visible";
  const std::string nccl = "NCCL backend built in";
#else
  const std::string cuda = "CPU build (no CUDA)";
  const std::string nccl = "no NCCL backend";
#endif
  return fmt::format("sdt {} (commit {})\nLibTorch {}; {}; {}\nMPI: {}\nHDF5 {}.{}.{}; OpenCV {}\n", SDT_VERSION,
                     SDT_GIT_COMMIT, TORCH_VERSION, cuda, nccl, mpi_line, h5_major, h5_minor, h5_release, CV_VERSION);
}

}  // namespace sdt
