#include "core/kernels.h"
