#include "selftest.h"
