// runner serve: a local web view of a results database: the experiments, and for each the page `runner
// report` writes (runs table, curves, what trained, sample gallery), re-read from the database on every
// request so it follows a grid while it runs. Listens on 127.0.0.1 unless --host says otherwise; reads
// only (SQLite's WAL lets it read while the runner writes). One request at a time: a personal viewer.

#include <arpa/inet.h>
#include <csignal>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <iostream>
#include <map>
#include <sstream>

#include "ablate/sdk/error.hpp"
#include "cli/commands.hpp"
#include "report/html.hpp"
#include "report/text.hpp"

namespace ablate::cli {

namespace {

volatile std::sig_atomic_t g_stop = 0;
void on_signal(int) { g_stop = 1; }

struct Response {
  int status = 200;
  std::string type = "text/html; charset=utf-8";
  std::string body;
};

std::string url_decode(const std::string& s) {
  std::string out;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '%' && i + 2 < s.size() && std::isxdigit(static_cast<unsigned char>(s[i + 1])) &&
        std::isxdigit(static_cast<unsigned char>(s[i + 2]))) {
      out += static_cast<char>(std::stoi(s.substr(i + 1, 2), nullptr, 16));
      i += 2;
    } else {
      out += s[i] == '+' ? ' ' : s[i];
    }
  }
  return out;
}

std::string url_encode(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
      out += static_cast<char>(c);
    } else {
      char buf[4];
      std::snprintf(buf, sizeof buf, "%%%02X", c);
      out += buf;
    }
  }
  return out;
}

Response page(int status, const std::string& title, const std::string& body) {
  return {status, "text/html; charset=utf-8",
          "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><link rel=\"icon\" href=\"data:,\"><title>" +
              report::html_escape(title) + "</title></head><body>" + body + "</body></html>\n"};
}

Response index(store::Store& db, const std::string& db_name) {
  std::ostringstream h;
  h << "<h1>ablate results</h1><p>" << report::html_escape(db_name) << "</p><table border=\"1\" cellpadding=\"4\">"
    << "<tr><th>experiment</th><th>runs</th><th>status</th></tr>";
  for (const auto& name : db.experiment_names()) {
    const auto id = db.experiment_id(name);
    std::map<std::string, int> counts;
    const auto runs = db.runs(*id);
    for (const auto& r : runs) ++counts[store::status_name(r.status)];
    std::string statuses;
    for (const auto& [s, n] : counts) statuses += (statuses.empty() ? "" : ", ") + std::to_string(n) + " " + s;
    h << "<tr><td><a href=\"/experiment/" << report::html_escape(url_encode(name)) << "\">" << report::html_escape(name)
      << "</a></td><td>" << runs.size() << "</td><td>" << report::html_escape(statuses) << "</td></tr>";
  }
  h << "</table>";
  return page(200, "ablate results", h.str());
}

Response handle(const std::filesystem::path& file, const std::string& target, int refresh) {
  const auto path = url_decode(target.substr(0, target.find('?')));
  store::Store db(file, /*create=*/false);  // opened per request: every page shows the database as it is now
  if (path == "/") return index(db, file.string());
  if (path.rfind("/experiment/", 0) == 0) {
    report::PageOptions o;
    o.image_url = "/image/";
    o.refresh_seconds = refresh;
    o.back_link = "/";
    o.database = file.string();
    try {
      const auto view = report::load_experiment(db, path.substr(12), {}, file.string());
      return {200, "text/html; charset=utf-8", report::experiment_page(db, view, o)};
    } catch (const sdk::InputError& e) {
      return page(404, "not found", "<p>" + report::html_escape(e.what()) + "</p><p><a href=\"/\">all experiments</a></p>");
    }
  }
  if (path.rfind("/image/", 0) == 0) {
    if (auto im = db.image(path.substr(7))) return {200, "image/" + im->format, std::string(im->bytes.begin(), im->bytes.end())};
  }
  return page(404, "not found", "<p>nothing at " + report::html_escape(path) + "</p><p><a href=\"/\">all experiments</a></p>");
}

const char* reason(int status) {
  switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    default: return "Internal Server Error";
  }
}

void send_all(int fd, const std::string& data) {
  std::size_t sent = 0;
  while (sent < data.size()) {
    const auto n = ::send(fd, data.data() + sent, data.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) return;  // the client went away
    sent += static_cast<std::size_t>(n);
  }
}

// Reads one request's head (up to the blank line), with a deadline so a silent client cannot block others.
std::string read_head(int fd) {
  std::string head;
  char buf[4096];
  while (head.find("\r\n\r\n") == std::string::npos && head.size() < 65536) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 5000) <= 0) break;
    const auto n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) break;
    head.append(buf, static_cast<std::size_t>(n));
  }
  return head;
}

}  // namespace

int serve(const Common& common, const ServeArgs& args) {
  const auto file = args.db.empty() ? common.db : std::filesystem::path(args.db);
  if (!std::filesystem::exists(file)) throw sdk::InputError(file.string() + ": no results database here");
  { store::Store check(file, /*create=*/false); }  // not an ablate database: say so now, not per request

  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  if (::getaddrinfo(args.host.c_str(), std::to_string(args.port).c_str(), &hints, &found) != 0 || !found) {
    throw sdk::InputError("--host " + args.host + ": not an address this machine has");
  }
  std::unique_ptr<addrinfo, decltype(&freeaddrinfo)> addrs(found, freeaddrinfo);
  const int fd = ::socket(found->ai_family, found->ai_socktype, found->ai_protocol);
  if (fd < 0) throw std::runtime_error(std::string("socket: ") + std::strerror(errno));
  const int yes = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
  if (::bind(fd, found->ai_addr, found->ai_addrlen) != 0 || ::listen(fd, 16) != 0) {
    const std::string why = std::strerror(errno);
    ::close(fd);
    throw sdk::InputError(args.host + ":" + std::to_string(args.port) + ": cannot listen (" + why + ")");
  }
  sockaddr_storage bound{};
  socklen_t len = sizeof bound;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len);
  const int port = ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                                     : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  const bool v6 = found->ai_family == AF_INET6;
  std::cout << "serving " << file.string() << " at http://" << (v6 ? "[" : "") << args.host << (v6 ? "]" : "") << ":" << port
            << "/ (Ctrl-C stops)" << std::endl;

  g_stop = 0;
  auto old_int = std::signal(SIGINT, on_signal);
  auto old_term = std::signal(SIGTERM, on_signal);
  while (!g_stop) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 200) <= 0) continue;
    const int client = ::accept(fd, nullptr, nullptr);
    if (client < 0) continue;
    const auto head = read_head(client);
    std::istringstream line(head.substr(0, head.find("\r\n")));
    std::string method, target, version;
    line >> method >> target >> version;
    Response r;
    if (method.empty() || target.empty() || target[0] != '/') {
      r = page(400, "bad request", "<p>bad request</p>");
    } else if (method != "GET" && method != "HEAD") {
      r = page(405, "method not allowed", "<p>only GET</p>");
    } else {
      try {
        r = handle(file, target, args.refresh);
      } catch (const std::exception& e) {
        r = page(500, "error", "<p>" + report::html_escape(e.what()) + "</p>");
      }
    }
    std::ostringstream out;
    out << "HTTP/1.1 " << r.status << " " << reason(r.status) << "\r\nContent-Type: " << r.type
        << "\r\nContent-Length: " << r.body.size() << "\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
        << "Content-Security-Policy: default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'\r\n"
        << "Connection: close\r\n\r\n";
    send_all(client, out.str() + (method == "HEAD" ? "" : r.body));
    ::close(client);
    if (args.verbose) std::cerr << method << " " << report::printable(target) << " " << r.status << "\n";
  }
  std::signal(SIGINT, old_int);
  std::signal(SIGTERM, old_term);
  ::close(fd);
  std::cout << "stopped\n";
  return 0;
}

}  // namespace ablate::cli
