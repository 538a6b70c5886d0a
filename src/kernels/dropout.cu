// LoRA dropout masks on NVIDIA GPUs: element i is kept when the top 24 bits of
// splitmix64(seed + (i + 1) * golden) fall below `keep`. The same function runs
// on the CPU in src/model/dropout.rs, so every device draws the same mask.
extern "C" __global__ void dropout_mask(
    float *out,
    const unsigned long long n,
    const unsigned long long seed,
    const float keep,
    const float scale
) {
    const unsigned long long stride = (unsigned long long)blockDim.x * gridDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += stride) {
        unsigned long long z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        const float u = (float)(z >> 40) * (1.0f / 16777216.0f);
        out[i] = u < keep ? scale : 0.0f;
    }
}
