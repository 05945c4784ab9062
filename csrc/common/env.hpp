// Environment switches of the torch-free cores (header-only).
#pragma once

#include <cctype>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

namespace kexue {

// Whether environment variable `name` turns something off: "0", "off", "false" or "no", in any case.
inline bool env_says_off(const char* name) {
  const char* env = std::getenv(name);
  if (env == nullptr) return false;
  char lower[8] = {};
  for (std::size_t i = 0; env[i] != '\0'; ++i) {
    if (i + 1 == sizeof(lower)) return false;
    lower[i] = static_cast<char>(std::tolower(static_cast<unsigned char>(env[i])));
  }
  for (const char* off : {"0", "off", "false", "no"})
    if (std::strcmp(lower, off) == 0) return true;
  return false;
}

}  // namespace kexue
