// Detect bias init: one clean arithmetic and the planted bugs, selected at build time.
//
//   (default)        YP_BIAS_CLEAN   ultralytics' exact float32 bits for every nc and stride (measured for nc
//                                    1..200, strides 8/16/32). ultralytics computes
//                                    math.log(5 / nc / (640 / stride) ** 2) with `stride` a float32 tensor
//                                    element, so torch evaluates `python_float / tensor` as
//                                    reciprocal(tensor) * python_float (two float32 roundings, not one
//                                    division), squares in float32, and math.log takes the log in double.
//   BIAS=double      YP_BIAS_DOUBLE  planted: the whole formula in double, rounded once at the end. One ULP off
//                                    ultralytics at nc=38 (strides 16, 32), 155 and 190 (all strides), and at
//                                    nc=8, 32, 57, ... where it coincides with numpy's float32 value too.
//   BIAS=float       YP_BIAS_FLOAT   planted: the formula in float with a true division and std::pow/std::log
//                                    (logf is correctly rounded): one ULP off at nc=8 (stride 8), 32, 57, 102,
//                                    128, ... where it equals numpy's pure-float32 value; bitwise ultralytics'
//                                    at nc=12, 38 and 80.
//   BIAS=intdiv      YP_BIAS_INTDIV  planted: C integer division 5 / nc, which is 0 for nc > 5: log(0) = -inf.
//   BIAS=skip        YP_BIAS_SKIP    planted: bias_init never called; PyTorch's default conv bias remains.
#include "bias_init.hpp"

#include <cmath>

#if !defined(YP_BIAS_CLEAN) && !defined(YP_BIAS_DOUBLE) && !defined(YP_BIAS_FLOAT) && !defined(YP_BIAS_INTDIV) && \
    !defined(YP_BIAS_SKIP)
#define YP_BIAS_CLEAN 1
#endif

namespace yp {

#if defined(YP_BIAS_DOUBLE)
const char* bias_variant() { return "double"; }
#elif defined(YP_BIAS_FLOAT)
const char* bias_variant() { return "float"; }
#elif defined(YP_BIAS_INTDIV)
const char* bias_variant() { return "intdiv"; }
#elif defined(YP_BIAS_SKIP)
const char* bias_variant() { return "skip"; }
#else
const char* bias_variant() { return "clean"; }
#endif

bool bias_init_applied() {
#if defined(YP_BIAS_SKIP)
  return false;
#else
  return true;
#endif
}

float class_bias(int nc, float stride) {
#if defined(YP_BIAS_DOUBLE)
  return static_cast<float>(std::log(5.0 / nc / std::pow(640.0 / static_cast<double>(stride), 2)));
#elif defined(YP_BIAS_FLOAT)
  return std::log(5.0f / static_cast<float>(nc) / std::pow(640.0f / stride, 2.0f));
#elif defined(YP_BIAS_INTDIV)
  return std::log(static_cast<float>(5 / nc) / std::pow(640.0f / stride, 2.0f));  // 5 / nc: integer division
#else
  // Without -ffast-math the compiler keeps reciprocal-then-multiply (it is not the same as one division).
  float grid = (1.0f / stride) * 640.0f;        // 640 / stride      -> reciprocal(stride) * 640
  float area = grid * grid;                     // ** 2              -> float32 square
  float prior = (1.0f / area) * static_cast<float>(5.0 / nc);  // (5 / nc) / area -> reciprocal(area) * float(5 / nc)
  return static_cast<float>(std::log(static_cast<double>(prior)));  // math.log: double, stored as float32
#endif
}

float box_bias() { return 2.0f; }

}  // namespace yp
