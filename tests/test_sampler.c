/* tests/test_sampler.c — placeholder until the sampler tests land. */
#include "test.h"
void test_sampler(void) {}
