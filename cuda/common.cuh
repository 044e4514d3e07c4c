// shared helpers for onnxquant integer kernels
#pragma once
#include <stdint.h>
