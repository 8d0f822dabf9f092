"""FPGA target: Vitis-HLS C++ (streaming dataflow, one function per layer) with bit-exact C-simulation."""
