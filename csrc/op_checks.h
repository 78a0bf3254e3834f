// Input checks shared by the operators' launchers: each throws TypeError / ValueError
// (TORCH_CHECK_TYPE / _VALUE) naming the operator and the offending argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace maml_fast {

// `tensor` (argument `name` of operator `op`) has x's dtype and lives on x's device.
inline void check_dtype_and_device_of_x(
    const char* op, const char* name, const at::Tensor& tensor, const at::Tensor& x) {
  TORCH_CHECK_TYPE(
      tensor.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", tensor.scalar_type(),
      " but x has ", x.scalar_type());
  TORCH_CHECK_VALUE(
      tensor.device() == x.device(), op, ": ", name, " is on ", tensor.device(), " but x is on ",
      x.device());
}

}  // namespace maml_fast
