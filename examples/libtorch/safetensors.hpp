// A minimal safetensors reader and writer with its own tiny JSON parser: standard C++ only, no torch.
//
// The format (https://github.com/huggingface/safetensors): an 8-byte little-endian unsigned header length N,
// N bytes of JSON {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
// "__metadata__": {"key": "string", ...}}, then the raw little-endian tensor bytes; offsets are relative to the
// end of the header. This is all a port needs to read a yolo-parity layer file or dump and to write its own.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace yp {

// ------------------------------------------------------------------------------------------------ JSON
struct Json {
  enum class Type { Null, Bool, Number, String, Array, Object };
  Type type = Type::Null;
  bool boolean = false;
  double number = 0.0;
  int64_t integer = 0;  // exact value when the number is written without fraction or exponent
  bool is_integer = false;
  std::string string;
  std::vector<Json> array;
  std::vector<std::pair<std::string, Json>> object;  // in file order

  const Json* find(const std::string& key) const {
    for (const auto& kv : object)
      if (kv.first == key) return &kv.second;
    return nullptr;
  }
  const Json& at(const std::string& key) const {
    const Json* v = find(key);
    if (!v) throw std::runtime_error("JSON object has no key '" + key + "'");
    return *v;
  }
  int64_t as_int() const {
    if (type != Type::Number) throw std::runtime_error("JSON value is not a number");
    return is_integer ? integer : static_cast<int64_t>(number);
  }
  double as_double() const {
    if (type != Type::Number) throw std::runtime_error("JSON value is not a number");
    return is_integer ? static_cast<double>(integer) : number;
  }
};

class JsonParser {
 public:
  explicit JsonParser(const std::string& text) : s_(text) {}

  Json parse() {
    Json value = parse_value();
    skip_ws();
    if (pos_ != s_.size()) fail("trailing characters after the JSON value");
    return value;
  }

 private:
  const std::string& s_;
  size_t pos_ = 0;

  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error("JSON parse error at byte " + std::to_string(pos_) + ": " + what);
  }
  void skip_ws() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\n' || s_[pos_] == '\r' || s_[pos_] == '\t')) ++pos_;
  }
  char peek() {
    skip_ws();
    if (pos_ >= s_.size()) fail("unexpected end of input");
    return s_[pos_];
  }
  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "'");
    ++pos_;
  }
  bool consume(const char* word) {
    size_t n = std::strlen(word);
    if (s_.compare(pos_, n, word) == 0) {
      pos_ += n;
      return true;
    }
    return false;
  }

  Json parse_value() {
    char c = peek();
    Json v;
    if (c == '{') {
      v.type = Json::Type::Object;
      ++pos_;
      if (peek() == '}') { ++pos_; return v; }
      while (true) {
        if (peek() != '"') fail("expected a string key");
        std::string key = parse_string();
        expect(':');
        v.object.emplace_back(std::move(key), parse_value());
        char d = peek();
        ++pos_;
        if (d == '}') break;
        if (d != ',') fail("expected ',' or '}'");
      }
    } else if (c == '[') {
      v.type = Json::Type::Array;
      ++pos_;
      if (peek() == ']') { ++pos_; return v; }
      while (true) {
        v.array.push_back(parse_value());
        char d = peek();
        ++pos_;
        if (d == ']') break;
        if (d != ',') fail("expected ',' or ']'");
      }
    } else if (c == '"') {
      v.type = Json::Type::String;
      v.string = parse_string();
    } else if (consume("true")) {
      v.type = Json::Type::Bool;
      v.boolean = true;
    } else if (consume("false")) {
      v.type = Json::Type::Bool;
    } else if (consume("null")) {
      v.type = Json::Type::Null;
    } else {
      parse_number(v);
    }
    return v;
  }

  void parse_number(Json& v) {
    size_t start = pos_;
    bool integral = true;
    if (s_[pos_] == '-') ++pos_;
    while (pos_ < s_.size()) {
      char c = s_[pos_];
      if (c >= '0' && c <= '9') { ++pos_; continue; }
      if (c == '.' || c == 'e' || c == 'E' || c == '+' || c == '-') { integral = false; ++pos_; continue; }
      break;
    }
    if (start == pos_ || (pos_ == start + 1 && s_[start] == '-')) fail("expected a value");
    std::string text = s_.substr(start, pos_ - start);
    v.type = Json::Type::Number;
    v.number = std::strtod(text.c_str(), nullptr);
    if (integral) {
      v.is_integer = true;
      v.integer = std::strtoll(text.c_str(), nullptr, 10);
    }
  }

  static void put_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  uint32_t hex4() {
    if (pos_ + 4 > s_.size()) fail("truncated \\u escape");
    uint32_t cp = 0;
    for (int i = 0; i < 4; ++i) {
      char h = s_[pos_++];
      cp <<= 4;
      if (h >= '0' && h <= '9') cp |= h - '0';
      else if (h >= 'a' && h <= 'f') cp |= h - 'a' + 10;
      else if (h >= 'A' && h <= 'F') cp |= h - 'A' + 10;
      else fail("bad \\u escape");
    }
    return cp;
  }

  std::string parse_string() {
    expect('"');
    std::string out;
    while (true) {
      if (pos_ >= s_.size()) fail("unterminated string");
      char c = s_[pos_++];
      if (c == '"') break;
      if (c != '\\') { out += c; continue; }
      if (pos_ >= s_.size()) fail("unterminated escape");
      char e = s_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00 && pos_ + 1 < s_.size() && s_[pos_] == '\\' && s_[pos_ + 1] == 'u') {
            pos_ += 2;
            uint32_t low = hex4();
            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
          }
          put_utf8(out, cp);
          break;
        }
        default: fail("unknown escape");
      }
    }
    return out;
  }
};

inline Json parse_json(const std::string& text) { return JsonParser(text).parse(); }

inline std::string json_escape(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

// ----------------------------------------------------------------------------------------- safetensors
inline size_t dtype_size(const std::string& dtype) {
  static const std::map<std::string, size_t> sizes = {
      {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8}, {"I32", 4}, {"I16", 2},
      {"I8", 1},  {"U8", 1},  {"U16", 2}, {"U32", 4},  {"U64", 8}, {"BOOL", 1}};
  auto it = sizes.find(dtype);
  if (it == sizes.end()) throw std::runtime_error("unknown safetensors dtype '" + dtype + "'");
  return it->second;
}

struct TensorView {
  std::string dtype;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // points into the file's buffer
  size_t nbytes = 0;
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
};

class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path) : path_(path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error(path + ": cannot open");
    in.seekg(0, std::ios::end);
    size_t size = static_cast<size_t>(in.tellg());
    in.seekg(0);
    if (size < 8) throw std::runtime_error(path + ": truncated (" + std::to_string(size) + " bytes)");
    uint8_t len_bytes[8];
    in.read(reinterpret_cast<char*>(len_bytes), 8);
    uint64_t length = 0;
    for (int i = 7; i >= 0; --i) length = (length << 8) | len_bytes[i];  // little-endian
    if (length > size - 8)
      throw std::runtime_error(path + ": truncated or corrupt: header length " + std::to_string(length) +
                               " exceeds the file");
    std::string header(length, '\0');
    in.read(header.data(), static_cast<std::streamsize>(length));
    size_t data_size = size - 8 - length;
    buffer_.resize(data_size);
    in.read(reinterpret_cast<char*>(buffer_.data()), static_cast<std::streamsize>(data_size));
    if (!in) throw std::runtime_error(path + ": read failed");
    Json root = parse_json(header);
    if (root.type != Json::Type::Object) throw std::runtime_error(path + ": header is not a JSON object");
    for (const auto& kv : root.object) {
      if (kv.first == "__metadata__") {
        for (const auto& m : kv.second.object) metadata_[m.first] = m.second.string;
        continue;
      }
      TensorView view;
      view.dtype = kv.second.at("dtype").string;
      for (const auto& d : kv.second.at("shape").array) view.shape.push_back(d.as_int());
      const auto& offsets = kv.second.at("data_offsets").array;
      size_t begin = static_cast<size_t>(offsets.at(0).as_int()), end = static_cast<size_t>(offsets.at(1).as_int());
      if (end < begin || end > data_size) throw std::runtime_error(path + ": tensor '" + kv.first + "' is truncated");
      if (static_cast<size_t>(view.numel()) * dtype_size(view.dtype) != end - begin)
        throw std::runtime_error(path + ": tensor '" + kv.first + "' has a byte range that does not fit its shape");
      view.data = buffer_.data() + begin;
      view.nbytes = end - begin;
      names_.push_back(kv.first);
      tensors_[kv.first] = view;
    }
  }

  bool has(const std::string& name) const { return tensors_.count(name) != 0; }
  const TensorView& get(const std::string& name) const {
    auto it = tensors_.find(name);
    if (it == tensors_.end()) throw std::runtime_error(path_ + ": no tensor named '" + name + "'");
    return it->second;
  }
  const std::vector<std::string>& names() const { return names_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  std::string meta(const std::string& key) const {
    auto it = metadata_.find(key);
    if (it == metadata_.end()) throw std::runtime_error(path_ + ": metadata has no '" + key + "'");
    return it->second;
  }

 private:
  std::string path_;
  std::vector<uint8_t> buffer_;
  std::vector<std::string> names_;
  std::map<std::string, TensorView> tensors_;
  std::map<std::string, std::string> metadata_;
};

// A writer: collect tensors (dtype, shape, little-endian bytes), then write header + data in one go.
class SafetensorsWriter {
 public:
  void add(const std::string& name, const std::string& dtype, const std::vector<int64_t>& shape, const void* data,
           size_t nbytes) {
    for (const auto& e : entries_)
      if (e.name == name) throw std::runtime_error("tensor '" + name + "' written twice");
    Entry e{name, dtype, shape, std::vector<uint8_t>(static_cast<const uint8_t*>(data),
                                                     static_cast<const uint8_t*>(data) + nbytes)};
    entries_.push_back(std::move(e));
  }
  void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }

  // {name: {"dtype", "shape"}} of what was added: the manifest's tensor index needs it.
  std::string index_json(const std::string& file) const {
    std::ostringstream out;
    out << "{";
    for (size_t i = 0; i < entries_.size(); ++i) {
      const auto& e = entries_[i];
      out << (i ? ",\n  " : "\n  ") << json_escape(e.name) << ": {\"file\": " << json_escape(file)
          << ", \"dtype\": " << json_escape(e.dtype) << ", \"shape\": " << shape_json(e.shape) << "}";
    }
    out << "\n }";
    return out.str();
  }

  void write(const std::string& path) const {
    std::ostringstream header;
    header << "{";
    size_t offset = 0;
    bool first = true;
    if (!metadata_.empty()) {
      header << "\"__metadata__\":{";
      bool f = true;
      for (const auto& kv : metadata_) {
        header << (f ? "" : ",") << json_escape(kv.first) << ":" << json_escape(kv.second);
        f = false;
      }
      header << "}";
      first = false;
    }
    for (const auto& e : entries_) {
      header << (first ? "" : ",") << json_escape(e.name) << ":{\"dtype\":" << json_escape(e.dtype)
             << ",\"shape\":" << shape_json(e.shape) << ",\"data_offsets\":[" << offset << ","
             << offset + e.bytes.size() << "]}";
      offset += e.bytes.size();
      first = false;
    }
    header << "}";
    std::string text = header.str();
    while (text.size() % 8) text += ' ';  // the data section starts 8-byte aligned
    std::string tmp = path + ".partial";
    {
      std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
      if (!out) throw std::runtime_error(path + ": cannot write");
      uint64_t length = text.size();
      uint8_t len_bytes[8];
      for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<uint8_t>(length >> (8 * i));
      out.write(reinterpret_cast<const char*>(len_bytes), 8);
      out.write(text.data(), static_cast<std::streamsize>(text.size()));
      for (const auto& e : entries_) out.write(reinterpret_cast<const char*>(e.bytes.data()),
                                               static_cast<std::streamsize>(e.bytes.size()));
      if (!out) throw std::runtime_error(path + ": write failed");
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) throw std::runtime_error(path + ": rename failed");
  }

 private:
  struct Entry {
    std::string name;
    std::string dtype;
    std::vector<int64_t> shape;
    std::vector<uint8_t> bytes;
  };
  std::vector<Entry> entries_;
  std::map<std::string, std::string> metadata_;

  static std::string shape_json(const std::vector<int64_t>& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? "," : "") + std::to_string(shape[i]);
    return s + "]";
  }
};

}  // namespace yp
