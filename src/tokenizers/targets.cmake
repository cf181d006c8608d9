# CLIP and T5 tokenizers (no LibTorch) and their tests. ICU supplies Unicode character classes, case mapping
# and normalization; zlib reads OpenAI's gzip-compressed vocabulary; Debian's libsentencepiece runs T5's
# SentencePiece model (found by file: a build bundle has no pkg-config files).
find_package(ICU REQUIRED COMPONENTS uc data)
find_package(ZLIB REQUIRED)
find_path(SENTENCEPIECE_INCLUDE_DIR sentencepiece_processor.h REQUIRED)
find_library(SENTENCEPIECE_LIBRARY sentencepiece REQUIRED)

add_library(sdt_tokenizers STATIC
  src/tokenizers/text_cleaning.cpp
  src/tokenizers/clip_tokenizer.cpp
  src/tokenizers/kohya_prompt.cpp
  src/tokenizers/t5_tokenizer.cpp
)
target_include_directories(sdt_tokenizers PRIVATE ${SENTENCEPIECE_INCLUDE_DIR})
target_link_libraries(sdt_tokenizers PUBLIC sdt_core PRIVATE ICU::uc ICU::data ZLIB::ZLIB nlohmann_json::nlohmann_json
                      ${SENTENCEPIECE_LIBRARY})

# OpenAI's CLIP vocabulary ships in data/tokenizers/clip/ (MIT, its LICENSE beside it).
add_executable(test_clip_tokenizer tests/tokenizers/test_clip_tokenizer.cpp)
target_link_libraries(test_clip_tokenizer PRIVATE sdt_tokenizers nlohmann_json::nlohmann_json ZLIB::ZLIB GTest::gtest_main)
target_compile_definitions(test_clip_tokenizer PRIVATE
  SDT_CLIP_VOCAB_GZ="${CMAKE_SOURCE_DIR}/data/tokenizers/clip/bpe_simple_vocab_16e6.txt.gz"
  SDT_TOKENIZER_FIXTURES="${CMAKE_SOURCE_DIR}/tests/fixtures/tokenizers")
gtest_discover_tests(test_clip_tokenizer DISCOVERY_TIMEOUT 60)

# T5's shipped spiece.model (data/tokenizers/t5/, Apache-2.0) and a small model the generator trains, against
# transformers' T5TokenizerFast (tests/fixtures/tokenizers/gen_t5_tokenizer_fixtures.py).
add_executable(test_t5_tokenizer tests/tokenizers/test_t5_tokenizer.cpp)
target_link_libraries(test_t5_tokenizer PRIVATE sdt_tokenizers nlohmann_json::nlohmann_json GTest::gtest_main)
target_compile_definitions(test_t5_tokenizer PRIVATE
  SDT_T5_SPIECE="${CMAKE_SOURCE_DIR}/data/tokenizers/t5/spiece.model"
  SDT_TOKENIZER_FIXTURES="${CMAKE_SOURCE_DIR}/tests/fixtures/tokenizers")
gtest_discover_tests(test_t5_tokenizer DISCOVERY_TIMEOUT 60)
