// Small helpers for the argument checks of every operator's host code.
#pragma once

#include <ATen/ATen.h>

#include <sstream>
#include <string>

namespace mtseg {

// A tensor's shape as "[2, 3, 4]", for error messages.
inline std::string shape_of(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

}  // namespace mtseg
