// docs/configuration.md carries the argument and dataset key tables generated from the code, so the
// reference cannot drift. To refresh it after changing a table: SDT_UPDATE_DOCS=1 build/test_core
// --gtest_filter='Docs.*'
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include "src/core/dataset_config.h"
#include "src/core/train_args.h"

namespace sdt {
namespace {

const std::string kDoc = SDT_SOURCE_DIR "/docs/configuration.md";

std::string read(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// Replaces (or checks) the text between the BEGIN/END markers named `section`.
void check_section(const std::string& section, const std::string& generated) {
  std::string doc = read(kDoc);
  const std::string begin = "<!-- BEGIN GENERATED: " + section + " -->\n";
  const std::string end = "<!-- END GENERATED: " + section + " -->";
  size_t b = doc.find(begin);
  size_t e = doc.find(end);
  ASSERT_NE(b, std::string::npos) << kDoc << " lacks the marker " << begin;
  ASSERT_NE(e, std::string::npos) << kDoc << " lacks the marker " << end;
  b += begin.size();
  if (std::getenv("SDT_UPDATE_DOCS")) {
    doc.replace(b, e - b, generated);
    std::ofstream(kDoc) << doc;
    return;
  }
  EXPECT_EQ(doc.substr(b, e - b), generated)
      << kDoc << " is out of date; run: SDT_UPDATE_DOCS=1 build/test_core --gtest_filter='Docs.*'";
}

TEST(Docs, ConfigurationReferenceListsEveryTrainArgument) {
  check_section("train arguments", train_args_reference_markdown());
}

TEST(Docs, ConfigurationReferenceListsEveryDatasetKey) {
  check_section("dataset keys", dataset_keys_reference_markdown());
}

}  // namespace
}  // namespace sdt
