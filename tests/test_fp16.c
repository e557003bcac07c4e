/* tests/test_fp16.c — placeholder until the fp16 tests land. */
#include "test.h"
void test_fp16(void) {}
