// yp_detect: the Detect head of YOLO11 (and YOLOv8) in LibTorch C++, run against a yolo-parity layer file.
//
//   yp_detect --layer-file layer23.safetensors --out port23.safetensors [--dump DIR] [--threads N] [--seed S]
//
// It reads the file written by `parity export-layer --layer 23` (inputs, parameters under ultralytics' names,
// metadata: nc, reg_max, strides), builds a FRESH head whose channel counts come from the parameter shapes,
// runs the port's own bias_init on it and records those biases, loads the reference parameters, runs the
// train-mode forward (BatchNorm normalises with the batch's statistics, eps 1e-3) and writes every stage's
// output under the dump names (act.23.cv2.0.0, ..., act.23.boxes, act.23.scores, act.23.dfl) plus
// init.cls_bias.{l}.stored / init.box_bias.{l}.stored. `parity check-layer` judges that file; with --dump the
// same tensors are also written as a candidate dump directory (outputs.safetensors + manifest.json).
//
// Box branch cv2[l]:  Conv3x3+BN+SiLU, Conv3x3+BN+SiLU, Conv1x1 (bias)          -> (B, 4*reg_max, H, W)
// Class branch cv3[l] (YOLO11): [DWConv3x3+BN+SiLU, Conv1x1+BN+SiLU], [DWConv3x3+BN+SiLU, Conv1x1+BN+SiLU],
//                     Conv1x1 (bias)                                              -> (B, nc, H, W)
// (YOLOv8's legacy class branch, Conv3x3+BN+SiLU twice then Conv1x1, is read the same way.)
// boxes = cat over levels of (B, 4*reg_max, H*W) -> (B, 4*reg_max, A); scores likewise; levels P3 first.
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>
#include <torch/utils.h>
#include <torch/version.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "bias_init.hpp"
#include "safetensors.hpp"

namespace {

constexpr double kBnEps = 1e-3;       // ultralytics' initialize_weights()
constexpr double kBnMomentum = 0.03;  // idem; only the running statistics depend on it

struct Args {
  std::string layer_file;
  std::string out;
  std::string dump;
  int threads = 2;
  uint64_t seed = 0;
};

[[noreturn]] void usage(const std::string& why) {
  std::cerr << "error: " << why << "\n"
            << "usage: yp_detect --layer-file LAYER.safetensors --out OUT.safetensors [--dump DIR] [--threads N] "
               "[--seed S]\n";
  std::exit(2);
}

Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(k + " needs a value");
      return argv[++i];
    };
    if (k == "--layer-file") a.layer_file = value();
    else if (k == "--out") a.out = value();
    else if (k == "--dump") a.dump = value();
    else if (k == "--threads") a.threads = std::stoi(value());
    else if (k == "--seed") a.seed = std::stoull(value());
    else if (k == "--variant") { std::cout << yp::bias_variant() << "\n"; std::exit(0); }
    else usage("unknown argument " + k);
  }
  if (a.layer_file.empty() || a.out.empty()) usage("--layer-file and --out are required");
  return a;
}

torch::Dtype torch_dtype(const std::string& dtype) {
  if (dtype == "F32") return torch::kFloat32;
  if (dtype == "F64") return torch::kFloat64;
  if (dtype == "F16") return torch::kFloat16;
  if (dtype == "BF16") return torch::kBFloat16;
  if (dtype == "I64") return torch::kInt64;
  if (dtype == "I32") return torch::kInt32;
  if (dtype == "U8") return torch::kUInt8;
  if (dtype == "BOOL") return torch::kBool;
  throw std::runtime_error("unsupported dtype " + dtype);
}

std::string dtype_name(torch::Dtype dtype) {
  if (dtype == torch::kFloat32) return "F32";
  if (dtype == torch::kFloat64) return "F64";
  if (dtype == torch::kInt64) return "I64";
  if (dtype == torch::kBool) return "BOOL";
  throw std::runtime_error("cannot write this dtype");
}

torch::Tensor load(const yp::SafetensorsFile& f, const std::string& name) {
  const yp::TensorView& v = f.get(name);
  auto t = torch::from_blob(const_cast<uint8_t*>(v.data), v.shape, torch::TensorOptions().dtype(torch_dtype(v.dtype)));
  return t.clone();  // own the memory: the file buffer is only borrowed
}

// One stage of a head branch, created fresh (PyTorch default init) from the parameter shapes.
struct Stage {
  enum class Kind { ConvBnSiLU, Conv, Sequence } kind = Kind::Conv;
  std::string path;  // relative to the layer: "cv3.0.0.1"
  torch::nn::Conv2d conv{nullptr};
  torch::nn::BatchNorm2d bn{nullptr};
  std::vector<Stage> children;
};

bool has_param(const yp::SafetensorsFile& f, int layer, const std::string& path, const std::string& leaf) {
  return f.has("param.model." + std::to_string(layer) + "." + path + "." + leaf);
}

std::vector<int64_t> param_shape(const yp::SafetensorsFile& f, int layer, const std::string& path,
                                 const std::string& leaf) {
  return f.get("param.model." + std::to_string(layer) + "." + path + "." + leaf).shape;
}

torch::nn::Conv2d fresh_conv(const std::vector<int64_t>& w, int64_t in_channels, bool bias) {
  // weight (out, in / groups, k, k): groups = in / w[1] (DWConv: groups = gcd(in, out) = in)
  int64_t groups = in_channels / w[1];
  int64_t k = w[2];
  return torch::nn::Conv2d(
      torch::nn::Conv2dOptions(in_channels, w[0], k).stride(1).padding(k / 2).groups(groups).bias(bias));
}

Stage make_stage(const yp::SafetensorsFile& f, int layer, const std::string& path, int64_t& channels) {
  Stage s;
  s.path = path;
  if (has_param(f, layer, path, "conv.weight")) {  // ultralytics Conv: conv (no bias) + BN + SiLU
    auto w = param_shape(f, layer, path, "conv.weight");
    s.kind = Stage::Kind::ConvBnSiLU;
    s.conv = fresh_conv(w, channels, false);
    s.bn = torch::nn::BatchNorm2d(torch::nn::BatchNormOptions(w[0]).eps(kBnEps).momentum(kBnMomentum));
    channels = w[0];
  } else if (has_param(f, layer, path, "weight")) {  // plain nn.Conv2d with bias (the last stage)
    auto w = param_shape(f, layer, path, "weight");
    s.kind = Stage::Kind::Conv;
    s.conv = fresh_conv(w, channels, has_param(f, layer, path, "bias"));
    channels = w[0];
  } else {  // a Sequential: children 0, 1, ...
    s.kind = Stage::Kind::Sequence;
    for (int j = 0;; ++j) {
      std::string child = path + "." + std::to_string(j);
      if (!has_param(f, layer, child, "conv.weight") && !has_param(f, layer, child, "weight") &&
          !has_param(f, layer, child + ".0", "conv.weight") && !has_param(f, layer, child + ".0", "weight"))
        break;
      s.children.push_back(make_stage(f, layer, child, channels));
    }
    if (s.children.empty()) throw std::runtime_error("no parameters for model." + std::to_string(layer) + "." + path);
  }
  return s;
}

void load_stage(Stage& s, const yp::SafetensorsFile& f, int layer) {
  torch::NoGradGuard no_grad;
  std::string p = "param.model." + std::to_string(layer) + "." + s.path + ".";
  switch (s.kind) {
    case Stage::Kind::ConvBnSiLU:
      s.conv->weight.copy_(load(f, p + "conv.weight"));
      s.bn->weight.copy_(load(f, p + "bn.weight"));
      s.bn->bias.copy_(load(f, p + "bn.bias"));
      s.bn->running_mean.copy_(load(f, p + "bn.running_mean"));
      s.bn->running_var.copy_(load(f, p + "bn.running_var"));
      break;
    case Stage::Kind::Conv:
      s.conv->weight.copy_(load(f, p + "weight"));
      if (s.conv->options.bias()) s.conv->bias.copy_(load(f, p + "bias"));
      break;
    case Stage::Kind::Sequence:
      for (auto& c : s.children) load_stage(c, f, layer);
      break;
  }
}

Stage& last_stage(Stage& s) { return s.kind == Stage::Kind::Sequence ? last_stage(s.children.back()) : s; }

using Outputs = std::vector<std::pair<std::string, torch::Tensor>>;

torch::Tensor run_stage(Stage& s, const torch::Tensor& x, int layer, Outputs& out) {
  torch::Tensor y;
  switch (s.kind) {
    case Stage::Kind::ConvBnSiLU:
      s.bn->train();  // train mode: batch statistics, as the reference was captured
      y = torch::silu(s.bn->forward(s.conv->forward(x)));
      break;
    case Stage::Kind::Conv:
      y = s.conv->forward(x);
      break;
    case Stage::Kind::Sequence:
      y = x;
      for (auto& c : s.children) y = run_stage(c, y, layer, out);
      break;
  }
  out.emplace_back("act." + std::to_string(layer) + "." + s.path, y);
  return y;
}

void add(yp::SafetensorsWriter& w, const std::string& name, const torch::Tensor& t) {
  torch::Tensor c = t.detach().contiguous().cpu();
  std::vector<int64_t> shape(c.sizes().begin(), c.sizes().end());
  w.add(name, dtype_name(c.scalar_type()), shape, c.data_ptr(), c.nbytes());
}

std::vector<double> parse_doubles(const std::string& json_text) {
  std::vector<double> out;
  for (const auto& v : yp::parse_json(json_text).array) out.push_back(v.as_double());
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  Args args = parse_args(argc, argv);
  try {
    auto started = std::chrono::steady_clock::now();
    torch::set_num_threads(args.threads);
    torch::manual_seed(args.seed);
    yp::SafetensorsFile f(args.layer_file);
    if (f.metadata().count("schema") == 0 || f.meta("schema") != "yolo-parity-layer")
      throw std::runtime_error(args.layer_file + " is not a layer file written by `parity export-layer`");
    const int layer = std::stoi(f.meta("layer"));
    const std::string type = f.meta("type");
    if (type != "Detect")
      throw std::runtime_error("layer " + std::to_string(layer) + " is a " + type + "; this example ports Detect only");
    const int nc = static_cast<int>(yp::parse_json(f.meta("nc")).as_int());
    const int reg_max = static_cast<int>(yp::parse_json(f.meta("reg_max")).as_int());
    const std::vector<double> strides = parse_doubles(f.meta("strides"));
    const size_t levels = strides.size();

    std::vector<torch::Tensor> x;
    for (size_t l = 0; l < levels; ++l) x.push_back(load(f, "input." + std::to_string(l)));

    // ---- a fresh head: channel counts from the parameter shapes, PyTorch default init
    std::vector<Stage> box_head, cls_head;
    for (size_t l = 0; l < levels; ++l) {
      int64_t c = x[l].size(1);
      box_head.push_back(make_stage(f, layer, "cv2." + std::to_string(l), c));
      c = x[l].size(1);
      cls_head.push_back(make_stage(f, layer, "cv3." + std::to_string(l), c));
      if (c != nc) throw std::runtime_error("class branch " + std::to_string(l) + " ends with " + std::to_string(c) +
                                            " channels, metadata nc is " + std::to_string(nc));
    }

    // ---- the port's own bias_init on the fresh head; record what it stores
    yp::SafetensorsWriter w;
    Outputs init;
    {
      torch::NoGradGuard no_grad;
      for (size_t l = 0; l < levels; ++l) {
        Stage& box_last = last_stage(box_head[l]);
        Stage& cls_last = last_stage(cls_head[l]);
        if (yp::bias_init_applied()) {
          box_last.conv->bias.fill_(yp::box_bias());
          cls_last.conv->bias.narrow(0, 0, nc).fill_(yp::class_bias(nc, static_cast<float>(strides[l])));
        }
        init.emplace_back("init.cls_bias." + std::to_string(l) + ".stored", cls_last.conv->bias.detach().clone());
        init.emplace_back("init.box_bias." + std::to_string(l) + ".stored", box_last.conv->bias.detach().clone());
      }
    }

    // ---- load the reference parameters, run the train-mode forward
    for (size_t l = 0; l < levels; ++l) {
      load_stage(box_head[l], f, layer);
      load_stage(cls_head[l], f, layer);
    }
    Outputs acts;
    torch::NoGradGuard no_grad;
    const int64_t batch = x[0].size(0);
    std::vector<torch::Tensor> boxes, scores;
    for (size_t l = 0; l < levels; ++l)
      boxes.push_back(run_stage(box_head[l], x[l], layer, acts).view({batch, 4 * reg_max, -1}));
    for (size_t l = 0; l < levels; ++l)
      scores.push_back(run_stage(cls_head[l], x[l], layer, acts).view({batch, nc, -1}));
    torch::Tensor all_boxes = torch::cat(boxes, -1), all_scores = torch::cat(scores, -1);
    const std::string prefix = "act." + std::to_string(layer) + ".";
    acts.emplace_back(prefix + "boxes", all_boxes);
    acts.emplace_back(prefix + "scores", all_scores);
    if (reg_max > 1) {  // DFL: softmax over the bins of each side, expectation with weights 0..reg_max-1
      int64_t anchors = all_boxes.size(2);
      std::string dfl_key = "param.model." + std::to_string(layer) + ".dfl.conv.weight";
      torch::Tensor weight = f.has(dfl_key) ? load(f, dfl_key)
                                            : torch::arange(reg_max, torch::kFloat32).view({1, reg_max, 1, 1});
      torch::Tensor probs = all_boxes.view({batch, 4, reg_max, anchors}).transpose(2, 1).softmax(1);
      acts.emplace_back(prefix + "dfl", torch::conv2d(probs, weight).view({batch, 4, anchors}));
    }

    for (auto& [name, t] : acts) add(w, name, t);
    for (auto& [name, t] : init) add(w, name, t);
    w.set_metadata("producer", "yolo-parity examples/libtorch yp_detect");
    w.set_metadata("bias_variant", yp::bias_variant());
    w.set_metadata("torch", TORCH_VERSION);
    w.set_metadata("layer", std::to_string(layer));
    w.write(args.out);

    if (!args.dump.empty()) {  // the same tensors as a candidate dump directory
      namespace fs = std::filesystem;
      fs::path dir(args.dump), tmp(args.dump + ".partial");
      fs::remove_all(tmp);
      fs::create_directories(tmp);
      w.write((tmp / "outputs.safetensors").string());
      std::ofstream manifest(tmp / "manifest.json");
      manifest << "{\n \"schema\": \"yolo-parity-dump\",\n \"schema_version\": 1,\n \"kind\": \"candidate\",\n"
               << " \"producer\": {\"tool\": \"yolo-parity examples/libtorch yp_detect\", \"bias_variant\": "
               << yp::json_escape(yp::bias_variant()) << ", \"torch\": " << yp::json_escape(TORCH_VERSION)
               << ", \"threads\": " << args.threads << "},\n"
               << " \"notes\": "
               << yp::json_escape("layer " + std::to_string(layer) + " run on the reference's own inputs from " +
                                  args.layer_file)
               << ",\n"
               << " \"tensors\": " << w.index_json("outputs.safetensors") << "\n}\n";
      manifest.close();
      fs::remove_all(dir);
      fs::rename(tmp, dir);
    }
    double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    std::cout << "yp_detect (bias " << yp::bias_variant() << "): layer " << layer << " " << type << ", nc " << nc
              << ", reg_max " << reg_max << ", " << levels << " levels, boxes " << all_boxes.sizes() << ", scores "
              << all_scores.sizes() << "; wrote " << acts.size() + init.size() << " tensors to " << args.out
              << (args.dump.empty() ? "" : " and the dump " + args.dump) << " in " << seconds << " s\n";
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "yp_detect: error: " << e.what() << "\n";
    return 2;
  }
}
