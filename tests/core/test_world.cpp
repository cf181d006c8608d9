// Process placement from the launcher's environment: mpirun, srun, or none.
#include <gtest/gtest.h>

#include <map>

#include "cluster/world.h"
#include "src/core/error.h"

namespace sdt {
namespace {

World world_with(const std::map<std::string, std::string>& env) {
  return world_from_environment([&](const char* name) -> std::optional<std::string> {
    auto it = env.find(name);
    return it == env.end() ? std::nullopt : std::optional<std::string>(it->second);
  });
}

TEST(World, WithoutALauncherThisIsRankZeroOfOne) {
  World w = world_with({});
  EXPECT_EQ(w.rank, 0);
  EXPECT_EQ(w.size, 1);
  EXPECT_EQ(w.launcher, "none");
}

TEST(World, OpenMpiVariablesWinOverSlurms) {
  World w = world_with({{"OMPI_COMM_WORLD_RANK", "3"}, {"OMPI_COMM_WORLD_SIZE", "8"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
                        {"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "1"}});
  EXPECT_EQ(w.rank, 3);
  EXPECT_EQ(w.size, 8);
  EXPECT_EQ(w.local_rank, 1);
  EXPECT_EQ(w.launcher, "openmpi");
}

TEST(World, SlurmSrun) {
  World w = world_with({{"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "6"}, {"SLURM_LOCALID", "2"}});
  EXPECT_EQ(w.rank, 5);
  EXPECT_EQ(w.local_rank, 2);
  EXPECT_EQ(w.launcher, "slurm");
}

TEST(World, InconsistentVariablesAreAnError) {
  EXPECT_THROW(world_with({{"SLURM_PROCID", "6"}, {"SLURM_NTASKS", "6"}}), Error);
  EXPECT_THROW(world_with({{"PMI_RANK", "x"}, {"PMI_SIZE", "2"}}), Error);
}

}  // namespace
}  // namespace sdt
