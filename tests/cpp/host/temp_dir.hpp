// A fresh, empty directory per test (for FileGroup rendezvous): named after the prefix, gtest's random
// seed and the running test, so concurrent or repeated runs never share one.
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <string>

inline std::string fresh_test_dir(const std::string& prefix) {
  const auto* unit = ::testing::UnitTest::GetInstance();
  const auto dir = std::filesystem::temp_directory_path() /
                   (prefix + std::to_string(unit->random_seed()) + "_" + unit->current_test_info()->name());
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir.string();
}
