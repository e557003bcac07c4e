/* tests/test_clip.c — placeholder until the clip tests land. */
#include "test.h"
void test_clip(void) {}
