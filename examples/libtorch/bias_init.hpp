// The Detect head's bias initialisation, in its own translation unit (no torch headers): the build plants
// bias-init bugs by compiling only this file with another -D flag (see Makefile, BIAS=...).
#pragma once

#include <vector>

namespace yp {

// Name of the arithmetic compiled in: "clean", "double", "float", "intdiv" or "skip".
const char* bias_variant();

// False for the "skip" variant: the port never calls bias_init and keeps the default conv bias.
bool bias_init_applied();

// The class-branch bias for one detection level: log(5 / nc / (640 / stride) ** 2), as float32.
float class_bias(int nc, float stride);

// The box-branch bias: ultralytics 8.4 sets 2.0 (1.0 up to 8.3.x).
float box_bias();

}  // namespace yp
