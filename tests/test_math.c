/* tests/test_math.c — placeholder until the math tests land. */
#include "test.h"
void test_math(void) {}
