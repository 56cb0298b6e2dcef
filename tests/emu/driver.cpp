// Driver for the emulator tests: runs named cases in one run order and prints one line per case,
//   CASE <name> <ok|mismatch|error> <detail>
// `error` carries the std::runtime_error message from the launch. tests/test_emu.py builds this
// with the kernels in tests/emu/*.cu (g++ -DFASTTFM_EMU) and asserts on the lines.
//
// usage: emu_driver <forward|reverse|random> <seed> <case> [<case> ...]
// cases: softmax/R/C/T  partial_warp/B/T  reverse_dyn/B/T  histogram  grid_index  shuffle/TYPE
//        votes  half_math  multithread  recovery  stats  time_softmax
//        missing_sync  missing_sync_fixed  divergent_sync  exit_before_sync  mask_excludes_lane
//        mask_includes_exited  mask_mismatch  bad_width  warp_deadlock  throwing  trap  poison
//        smem_overflow  smem_overread  launch_config/I
#include "ftfm_cuda.h"
#include "emu_cases.h"

#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

using namespace emu_tests;

namespace {

struct Result {
  std::string status, detail;
};
Result ok(std::string d = "") { return {"ok", d}; }
Result bad(std::string d) { return {"mismatch", d}; }

std::vector<int> split_ints(const std::string& name) {  // "softmax/4/100/32" -> {4, 100, 32}
  std::vector<int> v;
  std::stringstream ss(name);
  std::string part;
  std::getline(ss, part, '/');
  while (std::getline(ss, part, '/')) v.push_back(std::stoi(part));
  return v;
}

std::vector<float> randn(size_t n, unsigned seed, float scale = 3.0f) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

template <class T>
Result compare(const std::vector<T>& got, const std::vector<double>& want, double tol) {
  double worst = 0;
  size_t at = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    double e = std::fabs(double(got[i]) - want[i]);
    if (!(e <= worst)) worst = e, at = i;  // NaN counts as worst
  }
  char buf[160];
  std::snprintf(buf, sizeof buf, "max_err=%.3g at %zu (got %.9g want %.9g)", worst, at, double(got[at]), want[at]);
  return worst <= tol ? ok(buf) : bad(buf);
}

Result softmax_case(int rows, int cols, int threads, unsigned seed = 1) {
  auto x = randn(size_t(rows) * cols, seed);
  std::vector<float> y(x.size(), NAN);
  softmax_rows(x.data(), y.data(), rows, cols, threads);
  std::vector<double> want(x.size());
  for (int r = 0; r < rows; ++r) {
    const float* xr = &x[size_t(r) * cols];
    double m = -INFINITY, s = 0;
    for (int i = 0; i < cols; ++i) m = std::max(m, double(xr[i]));
    for (int i = 0; i < cols; ++i) s += std::exp(xr[i] - m);
    for (int i = 0; i < cols; ++i) want[size_t(r) * cols + i] = std::exp(xr[i] - m) / s;
  }
  return compare(y, want, 2e-6);
}

Result partial_warp_case(int blocks, int threads) {
  std::vector<int> out(3 * blocks, -1);
  partial_warp_sum(out.data(), blocks, threads);
  std::vector<double> want;
  for (int b = 0; b < blocks; ++b) want.insert(want.end(), {threads * (threads + 1) / 2.0, double((threads + 2) / 3), double((threads + 1) / 2)});
  return compare(out, want, 0);
}

Result histogram_case() {
  const int n = 5000, bins = 37;
  std::mt19937 g(7);
  std::vector<int> v(n);
  std::vector<float> w(n);
  for (int i = 0; i < n; ++i) v[i] = int(g() % bins), w[i] = float(g() % 8) * 0.25f;
  std::vector<int> hist(bins, 0);
  std::vector<float> whist(bins, 0.0f);
  double dsum = 0;
  unsigned long long total = 0;
  int vmax = -1, vmin = 1 << 30;
  histogram(v.data(), w.data(), n, bins, hist.data(), whist.data(), &dsum, &total, &vmax, &vmin);
  std::vector<double> want(bins * 2 + 4, 0.0), got;
  for (int i = 0; i < n; ++i) want[v[i]] += 1, want[bins + v[i]] += w[i], want[2 * bins] += w[i];
  want[2 * bins + 1] = n;
  want[2 * bins + 2] = *std::max_element(v.begin(), v.end());
  want[2 * bins + 3] = *std::min_element(v.begin(), v.end());
  got.assign(hist.begin(), hist.end());
  got.insert(got.end(), whist.begin(), whist.end());
  got.insert(got.end(), {dsum, double(total), double(vmax), double(vmin)});
  return compare(got, want, 0);  // weights are multiples of 1/4: every sum is exact
}

Result reverse_dyn_case(int blocks, int threads) {
  std::vector<int> in(size_t(blocks) * threads), out(in.size(), -1), align(blocks, -1);
  for (size_t i = 0; i < in.size(); ++i) in[i] = int(i * 3 + 1);
  reverse_dyn(in.data(), out.data(), align.data(), blocks, threads);
  std::vector<double> want, got(out.begin(), out.end());
  for (int b = 0; b < blocks; ++b)
    for (int t = 0; t < threads; ++t) want.push_back(in[size_t(b) * threads + threads - 1 - t]);
  for (int b = 0; b < blocks; ++b) want.push_back(0), got.push_back(align[b]);
  return compare(got, want, 0);
}

Result grid_index_case() {
  const int gx = 3, gy = 4, gz = 5, bx = 4, by = 3, bz = 2, nb = gx * gy * gz, nt = bx * by * bz;
  std::vector<int> out(nb * nt, -1), dims(nb * 6, -1);
  grid_index(out.data(), dims.data(), gx, gy, gz, bx, by, bz);
  std::vector<double> want, got(out.begin(), out.end());
  for (int z = 0; z < gz; ++z)
    for (int y = 0; y < gy; ++y)
      for (int x = 0; x < gx; ++x)
        for (int tz = 0; tz < bz; ++tz)
          for (int ty = 0; ty < by; ++ty)
            for (int tx = 0; tx < bx; ++tx) want.push_back(x + 10 * y + 100 * z + 1000 * tx + 10000 * ty + 100000 * tz);
  for (int b = 0; b < nb; ++b) {
    want.insert(want.end(), {double(gx), double(gy), double(gz), double(bx), double(by), double(bz)});
    got.insert(got.end(), dims.begin() + b * 6, dims.begin() + b * 6 + 6);
  }
  return compare(got, want, 0);
}

// Reference from the CUDA programming guide's wording (not the emulator's PTX formula).
Result shuffle_case(int type) {
  std::vector<double> out(6 * 4 * 64, NAN), want;
  shuffles(out.data(), type);
  auto value = [&](int t) {
    double v = t * 7 + 3;
    if (type == 4) return double(__half2float(__float2half(float(v))));
    if (type == 5) return double(__bfloat162float(__float2bfloat16(float(v))));
    return v;
  };
  for (int w = 32; w >= 1; w >>= 1) {
    for (int op = 0; op < 4; ++op)
      for (int t = 0; t < 64; ++t) {
        const int base = t & ~31, l = t & 31, seg = l / w * w;
        int src = l;
        if (op == 0) src = seg + (l * 3 + 1) % w;
        if (op == 1) src = l % w >= 3 ? l - 3 : l;
        if (op == 2) src = l % w + 5 < w ? l + 5 : l;
        if (op == 3) src = (l ^ 6) < seg + w ? (l ^ 6) : l;  // later groups: own value
        want.push_back(value(base + src));
      }
  }
  return compare(out, want, 0);
}

Result votes_case() {
  std::vector<unsigned> v(64 * 5, 0xdeadbeef);
  std::vector<int> s(4, -1);
  votes(v.data(), s.data());
  unsigned ballot = 0;
  for (int l = 0; l < 32; l += 3) ballot |= 1u << l;
  std::vector<double> want, got(v.begin(), v.end());
  for (int t = 0; t < 64; ++t) want.insert(want.end(), {double(ballot), 1, 0, 1});
  for (int t = 0; t < 64; ++t) want.push_back((t & 31) < 16 ? 0x0000aaaa : 0xaaaa0000u);
  want.insert(want.end(), {13, 1, 1, 0});
  got.insert(got.end(), s.begin(), s.end());
  return compare(got, want, 0);
}

Result half_math_case() {
  const int n = 100;
  const int blocks = (n + 63) / 64;
  std::vector<float> x(n), y(3 * n + blocks, NAN);
  for (int i = 0; i < n; ++i) x[i] = float((i * 37) % 81 - 40) * 0.25f;
  half_math(x.data(), y.data(), n);
  std::vector<double> want(3 * n);
  for (int b = 0; b < blocks; ++b) want.push_back(1.5 * std::min(64, n - 64 * b));
  for (int i = 0; i < n; ++i) {
    want[i] = 2.0 * x[i] + 1.0;
    want[n + i] = 2.0 * x[i];
    const int lane = i % 64 % 32;  // blocks of 64 threads
    want[2 * n + i] = lane == 31 ? 0.5 * x[i] : (i + 1 < n ? 0.5 * x[i + 1] : 0.0);
  }
  return compare(y, want, 0);
}

Result multithread_case() {  // launches from several OS threads at once
  std::vector<Result> rs(3);
  std::vector<std::thread> ts;
  for (int i = 0; i < 3; ++i) ts.emplace_back([&rs, i] {
    try {
      rs[i] = softmax_case(40, 300 + 50 * i, 64 * (i + 1), 10 + i);
    } catch (const std::exception& e) {
      rs[i] = {"error", e.what()};
    }
  });
  for (auto& t : ts) t.join();
  for (auto& r : rs)
    if (r.status != "ok") return r;
  return ok("3 threads");
}

Result recovery_case() {  // an aborted block leaves nothing behind
  std::vector<float> y(64);
  try {
    divergent_sync(y.data());
    return bad("divergent_sync did not throw");
  } catch (const std::runtime_error&) {
  }
  try {
    warp_deadlock(y.data());
    return bad("warp_deadlock did not throw");
  } catch (const std::runtime_error&) {
  }
  Result r = softmax_case(8, 333, 256);
  return r.status == "ok" ? ok("correct after two aborted launches; " + r.detail) : r;
}

Result stats_case() {
  ftfm_emu::reset_stats();
  std::vector<int> out(3 * 5);
  partial_warp_sum(out.data(), 5, 100);
  const ftfm_emu::Stats& s = ftfm_emu::stats();
  std::vector<double> want = {1, 5, 500}, got = {double(s.launches), double(s.blocks), double(s.threads)};
  Result r = compare(got, want, 0);
  return s.switches >= 500 ? r : bad("switches=" + std::to_string(s.switches));
}

Result time_softmax_case() {
  const int rows = 256, cols = 4096, threads = 256;
  auto x = randn(size_t(rows) * cols, 3);
  std::vector<float> y(x.size());
  softmax_rows(x.data(), y.data(), rows, cols, threads);  // warm: fills the stack pool
  double best = 1e9;
  for (int rep = 0; rep < 3; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    softmax_rows(x.data(), y.data(), rows, cols, threads);
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  Result r = softmax_case(rows, cols, threads, 3);
  char buf[64];
  std::snprintf(buf, sizeof buf, "seconds=%.4f ", best);
  return {r.status, buf + r.detail};
}

Result missing_sync_case(bool fixed) {
  const int rows = 4, n = 256;
  auto x = randn(size_t(rows) * n, 5);
  std::vector<float> y(x.size(), NAN);
  missing_sync(x.data(), y.data(), rows, n, fixed);
  std::vector<double> want(x.size());
  for (int r = 0; r < rows; ++r)
    for (int t = 0; t < n; ++t) want[size_t(r) * n + t] = x[size_t(r) * n + (t + 1 < n ? t + 1 : t)];
  return compare(y, want, 0);
}

Result poison_case() {
  const int n = 64;
  std::vector<unsigned> y(n, 0);
  poison_read(y.data(), n);
  std::vector<double> want(n, double(0xffffffffu));
  return compare(y, want, 0);
}

Result run_case(const std::string& name) {
  std::vector<float> y(1024, 0.0f);
  std::vector<unsigned> u(64, 0);
  const std::string base = name.substr(0, name.find('/'));
  const std::vector<int> a = split_ints(name);
  if (base == "softmax") return softmax_case(a.at(0), a.at(1), a.at(2));
  if (base == "partial_warp") return partial_warp_case(a.at(0), a.at(1));
  if (base == "reverse_dyn") return reverse_dyn_case(a.at(0), a.at(1));
  if (base == "histogram") return histogram_case();
  if (base == "grid_index") return grid_index_case();
  if (base == "shuffle") return shuffle_case(a.at(0));
  if (base == "votes") return votes_case();
  if (base == "half_math") return half_math_case();
  if (base == "multithread") return multithread_case();
  if (base == "recovery") return recovery_case();
  if (base == "stats") return stats_case();
  if (base == "time_softmax") return time_softmax_case();
  if (base == "missing_sync") return missing_sync_case(false);
  if (base == "missing_sync_fixed") return missing_sync_case(true);
  if (base == "poison") return poison_case();
  // the rest must throw; returning normally is a failure to detect the bug
  if (base == "divergent_sync") divergent_sync(y.data());
  else if (base == "exit_before_sync") exit_before_sync(y.data());
  else if (base == "mask_excludes_lane") mask_excludes_lane(y.data());
  else if (base == "mask_includes_exited") mask_includes_exited(y.data());
  else if (base == "mask_mismatch") mask_mismatch(y.data());
  else if (base == "bad_width") bad_width(y.data());
  else if (base == "warp_deadlock") warp_deadlock(y.data());
  else if (base == "throwing") throwing_kernel(y.data(), 4);
  else if (base == "trap") trap_kernel(y.data());
  else if (base == "smem_overflow") smem_overflow(u.data(), 64);
  else if (base == "smem_overread") smem_overread(u.data(), 64);
  else if (base == "launch_config") launch_config(a.at(0));
  else return {"unknown", "no such case"};
  return ok("no error raised");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s <forward|reverse|random> <seed> <case>...\n", argv[0]);
    return 2;
  }
  const std::string order = argv[1];
  const int o = order == "reverse" ? 1 : order == "random" ? 2 : 0;
  ftfm_emu::set_order(o, std::strtoull(argv[2], nullptr, 0));
  for (int i = 3; i < argc; ++i) {
    Result r;
    try {
      r = run_case(argv[i]);
    } catch (const std::exception& e) {
      r = {"error", e.what()};
    }
    for (char& c : r.detail)
      if (c == '\n') c = ' ';
    std::printf("CASE %s %s %s\n", argv[i], r.status.c_str(), r.detail.c_str());
    std::fflush(stdout);
  }
  return 0;
}
