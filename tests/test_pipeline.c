/* tests/test_pipeline.c — placeholder until the pipeline tests land. */
#include "test.h"
void test_pipeline(void) {}
