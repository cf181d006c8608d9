# Training progress, logs and sample prompts (no LibTorch): progress line, JSONL, TensorBoard event
# files, loss-curve PNG, kohya's --sample_prompts files.
add_library(sdt_train_metrics STATIC src/train/metrics.cpp src/train/sample_prompts.cpp)
target_link_libraries(sdt_train_metrics PUBLIC sdt_core sdt_data)

add_executable(test_train_metrics tests/train/test_metrics.cpp)
target_link_libraries(test_train_metrics PRIVATE sdt_train_metrics GTest::gtest_main)
gtest_discover_tests(test_train_metrics DISCOVERY_TIMEOUT 60)

# Event files our writer produces, read by TensorBoard itself (skipped, exit 77, without tensorboard).
add_executable(write_sample_tfevents tests/tools/write_sample_tfevents.cpp)
target_link_libraries(write_sample_tfevents PRIVATE sdt_train_metrics)
add_test(NAME tfevents_tensorboard_reads_ours
  COMMAND bash ${CMAKE_SOURCE_DIR}/tests/check_with_python.sh "${SDT_PYTHON}"
          ${CMAKE_SOURCE_DIR}/tests/check_tfevents_with_tensorboard.py $<TARGET_FILE:write_sample_tfevents>)
set_tests_properties(tfevents_tensorboard_reads_ours PROPERTIES SKIP_RETURN_CODE 77)
