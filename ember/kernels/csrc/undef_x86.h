/* Ends one ISA's copy of the x86 kernels (ember_kernels.c includes them once per instruction set). */
#undef DOT_US
#undef DOT4
#undef SIGNED_Q8
#undef SUFFIX
#undef UNPACK_Q8_0
#undef UNPACK_Q4_0
#undef UNPACK_Q4_1
#undef UNPACK_Q5_0
#undef UNPACK_Q5_1
