// CUDA kernels of the HOG operators: thin launch shells around the math in
// mtseg/hog.h, which the CPU kernels share (and so CPU tests exercise).
//  * cells: one thread per cell, summing its pixels in double; its histogram lives in
//    shared memory, laid out [bin][thread] so threads of a warp hit different banks;
//  * blocks: one thread per block; the backward gathers per cell (no atomics, so the
//    result is deterministic).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "mtseg/hog.h"
#include "mtseg/hog_host.h"

namespace mtseg {
namespace hog {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxCellThreads = 128;
constexpr int64_t kSharedBytes = 48 * 1024;

unsigned int blocks_for(int64_t items, int threads) {
  const int64_t blocks = (items + threads - 1) / threads;
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535LL * 8));
}

#define MTSEG_GRID_STRIDE(i, n) \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); i += static_cast<int64_t>(blockDim.x) * gridDim.x)

template <typename scalar_t>
struct ImageBatch {
  const scalar_t* data;
  int64_t channels, height, width;
  int64_t stride_b, stride_c, stride_h, stride_w;
  __device__ ImageView<scalar_t> image(int64_t b) const {
    return ImageView<scalar_t>{data + b * stride_b, channels, height, width, stride_c, stride_h, stride_w};
  }
};

template <typename scalar_t>
ImageBatch<scalar_t> image_batch(const at::Tensor& t) {
  return ImageBatch<scalar_t>{t.data_ptr<scalar_t>(), t.size(1), t.size(2), t.size(3),
                              t.stride(0),            t.stride(1), t.stride(2), t.stride(3)};
}

template <typename scalar_t, typename grad_t, typename acc_t>
__global__ void cells_kernel(ImageBatch<scalar_t> images, CellGeometry g, bool transform_sqrt, const double* table,
                             acc_t* cells) {
  extern __shared__ unsigned char shared_raw[];
  double* hist = reinterpret_cast<double*>(shared_raw);
  const int64_t n = g.orientations;
  const int64_t n_cells = g.batch * g.n_cells_row * g.n_cells_col;
  const int64_t cell = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (cell >= n_cells) return;
  const int64_t b = cell / (g.n_cells_row * g.n_cells_col);
  const int64_t r = (cell / g.n_cells_col) % g.n_cells_row, c = cell % g.n_cells_col;
  for (int64_t o = 0; o < n; ++o) hist[o * blockDim.x + threadIdx.x] = 0.0;
  const auto img = images.image(b);
  for (int64_t y = r * g.cell_rows; y < (r + 1) * g.cell_rows; ++y) {
    for (int64_t x = c * g.cell_cols; x < (c + 1) * g.cell_cols; ++x) {
      const auto px = pixel_gradient<grad_t>(img, y, x, transform_sqrt);
      accumulate(hist[orientation_bin(px.g_row, px.g_col, table, n) * blockDim.x + threadIdx.x], px.mag);
    }
  }
  for (int64_t o = 0; o < n; ++o) cells[cell * n + o] = cell_mean<acc_t>(hist[o * blockDim.x + threadIdx.x], g.area());
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
__global__ void stencil_kernel(ImageBatch<scalar_t> images, CellGeometry g, bool transform_sqrt, const double* table,
                               const acc_t* grad_cells, acc_t* d_row, acc_t* d_col, int32_t* channel) {
  const int64_t H = g.height, W = g.width;
  MTSEG_GRID_STRIDE(idx, g.batch * H * W) {
    const int64_t b = idx / (H * W), y = (idx / W) % H, x = idx % W;
    const auto px = pixel_gradient<grad_t>(images.image(b), y, x, transform_sqrt);
    double grad_mag = 0.0;
    if (y < g.n_cells_row * g.cell_rows && x < g.n_cells_col * g.cell_cols) {
      const int64_t bin = orientation_bin(px.g_row, px.g_col, table, g.orientations);
      const acc_t* gcell =
          grad_cells + ((b * g.n_cells_row + y / g.cell_rows) * g.n_cells_col + x / g.cell_cols) * g.orientations;
      grad_mag = static_cast<double>(gcell[bin]) / static_cast<double>(g.area());
    }
    const auto s = stencil_gradient(px, grad_mag);
    d_row[idx] = static_cast<acc_t>(s.d_row);
    d_col[idx] = static_cast<acc_t>(s.d_col);
    channel[idx] = static_cast<int32_t>(s.channel);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void input_gradient_kernel(ImageBatch<scalar_t> images, CellGeometry g, bool transform_sqrt,
                                      const acc_t* d_row, const acc_t* d_col, const int32_t* channel,
                                      acc_t* grad_images) {
  const int64_t H = g.height, W = g.width, C = g.channels;
  MTSEG_GRID_STRIDE(idx, g.batch * C * H * W) {
    const int64_t b = idx / (C * H * W), k = (idx / (H * W)) % C, y = (idx / W) % H, x = idx % W;
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
  const c10::cuda::CUDAGuard guard(images.device());
  check_image_values(images, transform_sqrt, "hog_cells");
  auto cells = at::empty({g.batch, g.n_cells_row, g.n_cells_col, g.orientations},
                         images.options().dtype(cell_dtype(images.scalar_type())));
  if (cells.numel() == 0) return cells;
  const auto table = orientation_table(orientations, images.device());
  const int64_t n_cells = g.batch * g.n_cells_row * g.n_cells_col;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_image_types(images.scalar_type(), [&](auto s, auto gr, auto acc) {
    using scalar_t = decltype(s);
    using grad_t = decltype(gr);
    using acc_t = decltype(acc);
    const int64_t per_thread = orientations * static_cast<int64_t>(sizeof(double));
    TORCH_CHECK_VALUE(per_thread <= kSharedBytes, "hog_cells: ", orientations,
                      " orientations do not fit the CUDA kernel's shared memory (at most ",
                      kSharedBytes / sizeof(double), ")");
    const int threads = static_cast<int>(std::min<int64_t>(kMaxCellThreads, kSharedBytes / per_thread));
    const unsigned int grid = static_cast<unsigned int>((n_cells + threads - 1) / threads);
    cells_kernel<scalar_t, grad_t, acc_t><<<grid, threads, threads * per_thread, stream>>>(
        image_batch<scalar_t>(images), g, transform_sqrt, table.data_ptr<double>(), cells.data_ptr<acc_t>());
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

at::Tensor hog_cuda(const at::Tensor& images, int64_t orientations, at::IntArrayRef pixels_per_cell,
                    at::IntArrayRef cells_per_block, c10::string_view block_norm, bool transform_sqrt) {
  cell_geometry(images, orientations, pixels_per_cell, cells_per_block, "hog");
  parse_block_norm(block_norm);
  return hog_blocks_cuda(hog_cells_cuda(images, orientations, pixels_per_cell, transform_sqrt), cells_per_block,
                         block_norm);
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

at::Tensor hog_cells_backward_cuda(const at::Tensor& grad_cells_in, const at::Tensor& images, int64_t orientations,
                                   at::IntArrayRef pixels_per_cell, bool transform_sqrt) {
  const int64_t one_cell[2] = {1, 1};
  const auto g = cell_geometry(images, orientations, pixels_per_cell, one_cell, "hog_cells_backward");
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
  const auto table = orientation_table(orientations, images.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_image_types(images.scalar_type(), [&](auto s, auto gr, auto acc) {
    using scalar_t = decltype(s);
    using grad_t = decltype(gr);
    using acc_t = decltype(acc);
    const auto batch = image_batch<scalar_t>(images);
    stencil_kernel<scalar_t, grad_t, acc_t><<<blocks_for(d_row.numel(), kThreads), kThreads, 0, stream>>>(
        batch, g, transform_sqrt, table.data_ptr<double>(), grad_cells.data_ptr<acc_t>(), d_row.data_ptr<acc_t>(),
        d_col.data_ptr<acc_t>(), channel.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    input_gradient_kernel<scalar_t, acc_t><<<blocks_for(grad_images.numel(), kThreads), kThreads, 0, stream>>>(
        batch, g, transform_sqrt, d_row.data_ptr<acc_t>(), d_col.data_ptr<acc_t>(), channel.data_ptr<int32_t>(),
        grad_images.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_images;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtseg, CUDA, m) {
  m.impl("hog", &hog_cuda);
  m.impl("hog_cells", &hog_cells_cuda);
  m.impl("hog_blocks", &hog_blocks_cuda);
  m.impl("hog_cells_backward", &hog_cells_backward_cuda);
  m.impl("hog_blocks_backward", &hog_blocks_backward_cuda);
}

}  // namespace hog
}  // namespace mtseg
