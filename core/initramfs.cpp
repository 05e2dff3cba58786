#include "core/initramfs.h"
