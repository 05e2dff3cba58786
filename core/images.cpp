#include "core/images.h"
