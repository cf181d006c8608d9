# CLIP tokenizer (no LibTorch) and its tests. ICU supplies Unicode character classes, case mapping
# and normalization; zlib reads OpenAI's gzip-compressed vocabulary.
find_package(ICU REQUIRED COMPONENTS uc data)
find_package(ZLIB REQUIRED)

add_library(sdt_tokenizers STATIC
  src/tokenizers/text_cleaning.cpp
  src/tokenizers/clip_tokenizer.cpp
  src/tokenizers/kohya_prompt.cpp
)
target_link_libraries(sdt_tokenizers PUBLIC sdt_core PRIVATE ICU::uc ICU::data ZLIB::ZLIB nlohmann_json::nlohmann_json)

# OpenAI's CLIP vocabulary ships in data/tokenizers/clip/ (MIT, its LICENSE beside it).
add_executable(test_clip_tokenizer tests/tokenizers/test_clip_tokenizer.cpp)
target_link_libraries(test_clip_tokenizer PRIVATE sdt_tokenizers nlohmann_json::nlohmann_json ZLIB::ZLIB GTest::gtest_main)
target_compile_definitions(test_clip_tokenizer PRIVATE
  SDT_CLIP_VOCAB_GZ="${CMAKE_SOURCE_DIR}/data/tokenizers/clip/bpe_simple_vocab_16e6.txt.gz"
  SDT_TOKENIZER_FIXTURES="${CMAKE_SOURCE_DIR}/tests/fixtures/tokenizers")
gtest_discover_tests(test_clip_tokenizer DISCOVERY_TIMEOUT 60)
