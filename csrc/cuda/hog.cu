// CUDA kernels of the HOG operators: launch shells around the math in mtseg/hog.h,
// which the CPU kernels share (and so CPU tests exercise).
//  * validity: one pass over the pixels sets a per-image flag for NaN/Inf (or negative
//    pixels with transform_sqrt); the kernels after it write NaN for a flagged image.
//    Nothing is copied to the host, so no call synchronises the device and every op can
//    be captured in a CUDA graph (the CPU raises ValueError instead; see ops/hog.py);
//  * cells: one warp per cell, each lane taking every 32nd pixel of it in a fixed order
//    and adding its magnitude to its own column of a per-warp histogram in shared
//    memory; each bin is then summed over the lanes by a fixed shuffle tree. No atomics,
//    so the result is the same on every run. Bins are hog.h's exact decision
//    (orientation_bin_exact, the same function the CPU uses for the pixels its vector
//    test cannot decide); gradients and the channel choice run in the image's precision
//    (float for float16/bfloat16/float32), magnitudes and sums in double;
//  * blocks: one thread per block; the backward gathers per cell (no atomics).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "mtseg/hog.h"
#include "mtseg/hog_host.h"

namespace mtseg {
namespace hog {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int64_t kSharedBytes = 48 * 1024;
// The exact test keeps its integers in per-thread local memory, sized for this many bins.
constexpr int64_t kMaxCudaOrientations = 64;
constexpr int64_t kExactLimbs = 4 * ((kMaxCudaOrientations * (53 + 6 + 3) + 31) / 32 + 3);
static_assert(kExactLimbs >= 4 * ((kMaxCudaOrientations * (53 + 6 + 3) + 31) / 32 + 3), "scratch too small");

unsigned int blocks_for(int64_t items, int threads) {
  const int64_t blocks = (items + threads - 1) / threads;
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535LL * 8));
}

#define MTSEG_GRID_STRIDE(i, n) \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); i += static_cast<int64_t>(blockDim.x) * gridDim.x)

template <typename scalar_t>
struct ImageBatch {
  const scalar_t* data;
  int64_t batch, channels, height, width;
  int64_t stride_b, stride_c, stride_h, stride_w;
  __device__ ImageView<scalar_t> image(int64_t b) const {
    return ImageView<scalar_t>{data + b * stride_b, channels, height, width, stride_c, stride_h, stride_w};
  }
};

template <typename scalar_t>
ImageBatch<scalar_t> image_batch(const at::Tensor& t) {
  return ImageBatch<scalar_t>{t.data_ptr<scalar_t>(), t.size(0), t.size(1), t.size(2), t.size(3),
                              t.stride(0),            t.stride(1), t.stride(2), t.stride(3)};
}

void check_cuda_orientations(int64_t orientations, const char* op) {
  TORCH_CHECK_VALUE(orientations <= kMaxCudaOrientations, op, ": the CUDA kernels decide exact bins for at most ",
                    kMaxCudaOrientations, " orientations, got ", orientations, " (use CPU tensors for more)");
}

// invalid[b] != 0 where image b holds NaN/Inf, or a negative pixel with transform_sqrt.
template <typename scalar_t>
__global__ void validity_kernel(ImageBatch<scalar_t> images, bool transform_sqrt, int32_t* invalid) {
  const int64_t C = images.channels, H = images.height, W = images.width;
  MTSEG_GRID_STRIDE(idx, images.batch * C * H * W) {
    const int64_t b = idx / (C * H * W), k = (idx / (H * W)) % C, y = (idx / W) % H, x = idx % W;
    const double v = static_cast<double>(images.data[b * images.stride_b + k * images.stride_c +
                                                     y * images.stride_h + x * images.stride_w]);
    if (!(v - v == 0.0) || (transform_sqrt && v < 0.0)) atomicOr(invalid + b, 1);
  }
}

template <typename scalar_t>
at::Tensor image_flags(const at::Tensor& images, bool transform_sqrt, cudaStream_t stream) {
  auto invalid = at::zeros({images.size(0)}, images.options().dtype(at::kInt));
  if (images.numel() == 0) return invalid;
  validity_kernel<scalar_t><<<blocks_for(images.numel(), kThreads), kThreads, 0, stream>>>(
      image_batch<scalar_t>(images), transform_sqrt, invalid.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return invalid;
}

// hog.h's exact bin with its integers in local memory; kept out of line so that the
// common path of the kernels does not carry the scratch array.
__device__ __noinline__ int exact_bin(double g_row, double g_col, const Edge* edges, int64_t n) {
  uint32_t scratch[kExactLimbs];
  const auto d = orientation_bin_exact(g_row, g_col, edges, n, scratch, kExactLimbs);
  return d.path < 0 ? -1 : d.bin;
}

__device__ void load_edges(Edge* edges, int64_t n) {
  for (int64_t i = threadIdx.x; i + 1 < n; i += blockDim.x) edges[i] = edge_direction(i + 1, n);
  __syncthreads();
}

template <typename scalar_t, typename grad_t, typename acc_t>
__global__ void cells_kernel(ImageBatch<scalar_t> images, CellGeometry g, bool transform_sqrt,
                             const int32_t* invalid, acc_t* cells) {
  extern __shared__ unsigned char shared_raw[];
  const int64_t n = g.orientations;
  Edge* edges = reinterpret_cast<Edge*>(shared_raw);
  double* hist_all = reinterpret_cast<double*>(shared_raw + kMaxCudaOrientations * sizeof(Edge));
  load_edges(edges, n);
  const int warps = blockDim.x / kWarp, warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  double* hist = hist_all + static_cast<int64_t>(warp) * n * kWarp;  // [bin][lane]
  const int64_t n_cells = g.batch * g.n_cells_row * g.n_cells_col;
  for (int64_t cell = static_cast<int64_t>(blockIdx.x) * warps + warp; cell < n_cells;
       cell += static_cast<int64_t>(gridDim.x) * warps) {
    const int64_t b = cell / (g.n_cells_row * g.n_cells_col);
    const int64_t r = (cell / g.n_cells_col) % g.n_cells_row, c = cell % g.n_cells_col;
    for (int64_t o = 0; o < n; ++o) hist[o * kWarp + lane] = 0.0;
    bool undecidable = false;
    if (invalid[b] == 0) {
      const auto img = images.image(b);
      for (int64_t p = lane; p < g.area(); p += kWarp) {
        const int64_t y = r * g.cell_rows + p / g.cell_cols, x = c * g.cell_cols + p % g.cell_cols;
        const auto px = pixel_gradient<grad_t>(img, y, x, transform_sqrt);
        const int bin = exact_bin(static_cast<double>(px.g_row), static_cast<double>(px.g_col), edges, n);
        if (bin < 0) {
          undecidable = true;
          continue;
        }
        accumulate(hist[bin * kWarp + lane], px.mag);
      }
    }
    const bool nan_cell = __any_sync(0xffffffffu, undecidable) || invalid[b] != 0;
    for (int64_t o = 0; o < n; ++o) {
      double v = hist[o * kWarp + lane];
      for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
      if (lane == 0)
        cells[cell * n + o] = nan_cell ? std::numeric_limits<acc_t>::quiet_NaN() : cell_mean<acc_t>(v, g.area());
    }
  }
}

template <typename cell_t>
__global__ void blocks_kernel(const cell_t* cells, BlockGeometry g, BlockNorm norm, cell_t* out) {
  const int64_t n_blocks = g.n_blocks_row * g.n_blocks_col;
  MTSEG_GRID_STRIDE(idx, g.batch * n_blocks) {
    const int64_t b = idx / n_blocks, r = (idx % n_blocks) / g.n_blocks_col, c = idx % g.n_blocks_col;
    const BlockView<cell_t> v{cells + ((b * g.n_cells_row + r) * g.n_cells_col + c) * g.orientations,
                              g.n_cells_col * g.orientations, g.b_row, g.b_col, g.orientations};
    normalize_block(v, norm, out + idx * g.block_len());
  }
}

template <typename cell_t>
__global__ void blocks_backward_kernel(const cell_t* cells, const cell_t* grad_out, BlockGeometry g, BlockNorm norm,
                                       cell_t* grad_blocks) {
  const int64_t n_blocks = g.n_blocks_row * g.n_blocks_col;
  MTSEG_GRID_STRIDE(idx, g.batch * n_blocks) {
    const int64_t b = idx / n_blocks, r = (idx % n_blocks) / g.n_blocks_col, c = idx % g.n_blocks_col;
    const BlockView<cell_t> v{cells + ((b * g.n_cells_row + r) * g.n_cells_col + c) * g.orientations,
                              g.n_cells_col * g.orientations, g.b_row, g.b_col, g.orientations};
    normalize_block_backward(v, norm, grad_out + idx * g.block_len(), grad_blocks + idx * g.block_len());
  }
}

template <typename cell_t>
__global__ void gather_cells_kernel(const cell_t* grad_blocks, BlockGeometry g, cell_t* grad_cells) {
  const int64_t per_image = g.n_cells_row * g.n_cells_col * g.orientations;
  MTSEG_GRID_STRIDE(idx, g.batch * per_image) {
    const int64_t b = idx / per_image, o = idx % g.orientations;
    const int64_t r = (idx / (g.n_cells_col * g.orientations)) % g.n_cells_row;
    const int64_t c = (idx / g.orientations) % g.n_cells_col;
    grad_cells[idx] = static_cast<cell_t>(
        gather_cell_gradient(grad_blocks + b * g.n_blocks_row * g.n_blocks_col * g.block_len(), g.n_blocks_row,
                             g.n_blocks_col, g.b_row, g.b_col, g.orientations, r, c, o));
  }
}

template <typename scalar_t, typename grad_t, typename acc_t>
__global__ void stencil_kernel(ImageBatch<scalar_t> images, CellGeometry g, bool transform_sqrt,
                               const int32_t* invalid, const acc_t* grad_cells, acc_t* d_row, acc_t* d_col,
                               int32_t* channel) {
  __shared__ Edge edges[kMaxCudaOrientations];
  load_edges(edges, g.orientations);
  const int64_t H = g.height, W = g.width;
  MTSEG_GRID_STRIDE(idx, g.batch * H * W) {
    const int64_t b = idx / (H * W), y = (idx / W) % H, x = idx % W;
    if (invalid[b] != 0) {
      d_row[idx] = d_col[idx] = acc_t(0);
      channel[idx] = 0;
      continue;
    }
    const auto px = pixel_gradient<grad_t>(images.image(b), y, x, transform_sqrt);
    double grad_mag = 0.0;
    if (y < g.n_cells_row * g.cell_rows && x < g.n_cells_col * g.cell_cols) {
      const int bin = exact_bin(static_cast<double>(px.g_row), static_cast<double>(px.g_col), edges, g.orientations);
      const acc_t* gcell =
          grad_cells + ((b * g.n_cells_row + y / g.cell_rows) * g.n_cells_col + x / g.cell_cols) * g.orientations;
      grad_mag = bin < 0 ? std::numeric_limits<double>::quiet_NaN()
                         : static_cast<double>(gcell[bin]) / static_cast<double>(g.area());
    }
    const auto s = stencil_gradient(px, grad_mag);
    d_row[idx] = static_cast<acc_t>(s.d_row);
    d_col[idx] = static_cast<acc_t>(s.d_col);
    channel[idx] = static_cast<int32_t>(s.channel);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void input_gradient_kernel(ImageBatch<scalar_t> images, CellGeometry g, bool transform_sqrt,
                                      const int32_t* invalid, const acc_t* d_row, const acc_t* d_col,
                                      const int32_t* channel, acc_t* grad_images) {
  const int64_t H = g.height, W = g.width, C = g.channels;
  MTSEG_GRID_STRIDE(idx, g.batch * C * H * W) {
    const int64_t b = idx / (C * H * W), k = (idx / (H * W)) % C, y = (idx / W) % H, x = idx % W;
    if (invalid[b] != 0) {
      grad_images[idx] = std::numeric_limits<acc_t>::quiet_NaN();
      continue;
    }
    const int64_t plane = b * H * W;
    double grad = input_gradient(d_row + plane, d_col + plane, channel + plane, H, W, k, y, x);
    if (transform_sqrt) grad = sqrt_chain(grad, images.image(b).template load<double>(k, y, x, false));
    grad_images[idx] = static_cast<acc_t>(grad);
  }
}

at::Tensor hog_cells_cuda(const at::Tensor& images, int64_t orientations, at::IntArrayRef pixels_per_cell,
                          bool transform_sqrt) {
  const int64_t one_cell[2] = {1, 1};
  const auto g = cell_geometry(images, orientations, pixels_per_cell, one_cell, "hog_cells");
  check_cuda_orientations(orientations, "hog_cells");
  const c10::cuda::CUDAGuard guard(images.device());
  auto cells = at::empty({g.batch, g.n_cells_row, g.n_cells_col, g.orientations},
                         images.options().dtype(cell_dtype(images.scalar_type())));
  if (cells.numel() == 0) return cells;
  const int64_t n_cells = g.batch * g.n_cells_row * g.n_cells_col;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_image_types(images.scalar_type(), [&](auto s, auto gr, auto acc) {
    using scalar_t = decltype(s);
    using grad_t = decltype(gr);
    using acc_t = decltype(acc);
    const at::Tensor invalid = image_flags<scalar_t>(images, transform_sqrt, stream);
    const int64_t per_warp = orientations * kWarp * static_cast<int64_t>(sizeof(double));
    const int64_t edge_bytes = kMaxCudaOrientations * static_cast<int64_t>(sizeof(Edge));
    const int warps = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(8, (kSharedBytes - edge_bytes) / per_warp)));
    const int64_t grid = std::min<int64_t>((n_cells + warps - 1) / warps, 65535LL * 8);
    cells_kernel<scalar_t, grad_t, acc_t><<<static_cast<unsigned int>(grid), warps * kWarp,
                                            edge_bytes + warps * per_warp, stream>>>(
        image_batch<scalar_t>(images), g, transform_sqrt, invalid.data_ptr<int32_t>(), cells.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return cells;
}

at::Tensor hog_blocks_cuda(const at::Tensor& cells_in, at::IntArrayRef cells_per_block, c10::string_view block_norm) {
  const auto g = block_geometry(cells_in, cells_per_block, "hog_blocks");
  const auto norm = parse_block_norm(block_norm);
  const c10::cuda::CUDAGuard guard(cells_in.device());
  const auto cells = cells_in.contiguous();
  auto out = at::empty({g.batch, g.n_blocks_row, g.n_blocks_col, g.b_row, g.b_col, g.orientations}, cells.options());
  const int64_t items = g.batch * g.n_blocks_row * g.n_blocks_col;
  if (items == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(cells.scalar_type(), "hog_blocks_cuda", [&] {
    blocks_kernel<scalar_t><<<blocks_for(items, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        cells.data_ptr<scalar_t>(), g, norm, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor hog_blocks_backward_cuda(const at::Tensor& grad_in, const at::Tensor& cells_in,
                                    at::IntArrayRef cells_per_block, c10::string_view block_norm) {
  const auto g = block_geometry(cells_in, cells_per_block, "hog_blocks_backward");
  const auto norm = parse_block_norm(block_norm);
  TORCH_CHECK_VALUE(grad_in.sizes() == at::IntArrayRef({g.batch, g.n_blocks_row, g.n_blocks_col, g.b_row, g.b_col,
                                                        g.orientations}),
                    "hog_blocks_backward: grad has shape ", grad_in.sizes(), ", which does not match the blocks");
  const c10::cuda::CUDAGuard guard(cells_in.device());
  const auto cells = cells_in.contiguous();
  const auto grad = grad_in.to(cells.scalar_type()).contiguous();
  auto grad_blocks = at::empty_like(grad);
  auto grad_cells = at::empty_like(cells);
  if (grad_cells.numel() == 0) return grad_cells;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(cells.scalar_type(), "hog_blocks_backward_cuda", [&] {
    const int64_t items = g.batch * g.n_blocks_row * g.n_blocks_col;
    blocks_backward_kernel<scalar_t><<<blocks_for(items, kThreads), kThreads, 0, stream>>>(
        cells.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), g, norm, grad_blocks.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    gather_cells_kernel<scalar_t><<<blocks_for(grad_cells.numel(), kThreads), kThreads, 0, stream>>>(
        grad_blocks.data_ptr<scalar_t>(), g, grad_cells.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_cells;
}

// Like the CPU, the images are checked (NaN/Inf, negative with transform_sqrt); a
// flagged image gets a NaN gradient instead of a ValueError, which would need a sync.
at::Tensor hog_cells_backward_cuda(const at::Tensor& grad_cells_in, const at::Tensor& images, int64_t orientations,
                                   at::IntArrayRef pixels_per_cell, bool transform_sqrt) {
  const int64_t one_cell[2] = {1, 1};
  const auto g = cell_geometry(images, orientations, pixels_per_cell, one_cell, "hog_cells_backward");
  check_cuda_orientations(orientations, "hog_cells_backward");
  TORCH_CHECK_VALUE(grad_cells_in.sizes() == at::IntArrayRef({g.batch, g.n_cells_row, g.n_cells_col, orientations}),
                    "hog_cells_backward: grad has shape ", grad_cells_in.sizes(), ", expected (", g.batch, ", ",
                    g.n_cells_row, ", ", g.n_cells_col, ", ", orientations, ")");
  const c10::cuda::CUDAGuard guard(images.device());
  const auto acc_dtype = cell_dtype(images.scalar_type());
  const auto grad_cells = grad_cells_in.to(acc_dtype).contiguous();
  auto grad_images = at::empty(images.sizes(), images.options().dtype(acc_dtype));
  if (grad_images.numel() == 0) return grad_images;
  const auto opts = images.options().dtype(acc_dtype);
  auto d_row = at::empty({g.batch, g.height, g.width}, opts);
  auto d_col = at::empty({g.batch, g.height, g.width}, opts);
  auto channel = at::empty({g.batch, g.height, g.width}, opts.dtype(at::kInt));
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_image_types(images.scalar_type(), [&](auto s, auto gr, auto acc) {
    using scalar_t = decltype(s);
    using grad_t = decltype(gr);
    using acc_t = decltype(acc);
    const auto batch = image_batch<scalar_t>(images);
    const at::Tensor invalid = image_flags<scalar_t>(images, transform_sqrt, stream);
    stencil_kernel<scalar_t, grad_t, acc_t><<<blocks_for(d_row.numel(), kThreads), kThreads, 0, stream>>>(
        batch, g, transform_sqrt, invalid.data_ptr<int32_t>(), grad_cells.data_ptr<acc_t>(), d_row.data_ptr<acc_t>(),
        d_col.data_ptr<acc_t>(), channel.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    input_gradient_kernel<scalar_t, acc_t><<<blocks_for(grad_images.numel(), kThreads), kThreads, 0, stream>>>(
        batch, g, transform_sqrt, invalid.data_ptr<int32_t>(), d_row.data_ptr<acc_t>(), d_col.data_ptr<acc_t>(),
        channel.data_ptr<int32_t>(), grad_images.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_images;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtseg, CUDA, m) {
  m.impl("hog_cells", &hog_cells_cuda);
  m.impl("hog_blocks", &hog_blocks_cuda);
  m.impl("hog_cells_backward", &hog_cells_backward_cuda);
  m.impl("hog_blocks_backward", &hog_blocks_backward_cuda);
}

}  // namespace hog
}  // namespace mtseg
