#include "store/sqlite.hpp"

#include <sqlite3.h>

#include "ablate/sdk/error.hpp"

namespace ablate::store {

namespace {
[[noreturn]] void fail(sqlite3* db, const std::string& what) {
  if (!db) throw SqlError(what + ": out of memory");
  const int code = sqlite3_errcode(db) & 0xff;
  if (code == SQLITE_CORRUPT || code == SQLITE_NOTADB) {
    // The file is damaged, not the program: bad input, named (a copy from a backup, or `sqlite3 FILE .recover`).
    const char* file = sqlite3_db_filename(db, "main");
    throw sdk::InputError(std::string(file && *file ? file : "results database") + ": damaged (" + sqlite3_errmsg(db) + ")");
  }
  throw SqlError(what + ": " + sqlite3_errmsg(db));
}
}  // namespace

Statement::Statement(sqlite3* db, const std::string& sql) : db_(db) {
  if (sqlite3_prepare_v2(db_, sql.c_str(), static_cast<int>(sql.size()), &stmt_, nullptr) != SQLITE_OK) {
    fail(db_, "preparing SQL");
  }
}

Statement::~Statement() {
  if (stmt_) sqlite3_finalize(stmt_);
}

Statement::Statement(Statement&& other) noexcept : db_(other.db_), stmt_(other.stmt_) { other.stmt_ = nullptr; }

Statement& Statement::bind(int index, std::int64_t value) {
  if (sqlite3_bind_int64(stmt_, index, value) != SQLITE_OK) fail(db_, "binding");
  return *this;
}
Statement& Statement::bind(int index, double value) {
  if (sqlite3_bind_double(stmt_, index, value) != SQLITE_OK) fail(db_, "binding");
  return *this;
}
Statement& Statement::bind(int index, const std::string& value) {
  if (sqlite3_bind_text(stmt_, index, value.data(), static_cast<int>(value.size()), SQLITE_TRANSIENT) != SQLITE_OK) {
    fail(db_, "binding");
  }
  return *this;
}
Statement& Statement::bind(int index, const std::vector<std::uint8_t>& blob) {
  if (sqlite3_bind_blob(stmt_, index, blob.data(), static_cast<int>(blob.size()), SQLITE_TRANSIENT) != SQLITE_OK) {
    fail(db_, "binding");
  }
  return *this;
}
Statement& Statement::bind(int index, std::nullopt_t) {
  if (sqlite3_bind_null(stmt_, index) != SQLITE_OK) fail(db_, "binding");
  return *this;
}

bool Statement::step() {
  const int rc = sqlite3_step(stmt_);
  if (rc == SQLITE_ROW) return true;
  if (rc == SQLITE_DONE) return false;
  fail(db_, "executing SQL");
}

void Statement::run() {
  while (step()) {
  }
}

void Statement::reset() {
  sqlite3_reset(stmt_);
  sqlite3_clear_bindings(stmt_);
}

bool Statement::is_null(int c) const { return sqlite3_column_type(stmt_, c) == SQLITE_NULL; }
std::int64_t Statement::int64(int c) const { return sqlite3_column_int64(stmt_, c); }
double Statement::real(int c) const { return sqlite3_column_double(stmt_, c); }
std::string Statement::text(int c) const {
  const auto* p = sqlite3_column_text(stmt_, c);
  return p ? std::string(reinterpret_cast<const char*>(p), static_cast<std::size_t>(sqlite3_column_bytes(stmt_, c))) : std::string();
}
std::vector<std::uint8_t> Statement::blob(int c) const {
  const auto* p = static_cast<const std::uint8_t*>(sqlite3_column_blob(stmt_, c));
  return p ? std::vector<std::uint8_t>(p, p + sqlite3_column_bytes(stmt_, c)) : std::vector<std::uint8_t>();
}
std::optional<double> Statement::maybe_real(int c) const {
  return is_null(c) ? std::nullopt : std::optional<double>(real(c));
}
std::optional<std::int64_t> Statement::maybe_int64(int c) const {
  return is_null(c) ? std::nullopt : std::optional<std::int64_t>(int64(c));
}

Database::Database(const std::filesystem::path& file, bool create) : file_(file) {
  const int flags = SQLITE_OPEN_READWRITE | (create ? SQLITE_OPEN_CREATE : 0) | SQLITE_OPEN_NOMUTEX;
  if (sqlite3_open_v2(file.c_str(), &db_, flags, nullptr) != SQLITE_OK) {
    std::string msg = db_ ? sqlite3_errmsg(db_) : "out of memory";
    if (db_) sqlite3_close(db_);
    db_ = nullptr;
    throw sdk::InputError(file.string() + ": cannot open database (" + msg + ")");
  }
  sqlite3_extended_result_codes(db_, 1);
  sqlite3_busy_timeout(db_, 10000);
  // Reading a file that is not SQLite fails here, with a clear message rather than at the first query. Only
  // read: whether the file is ours is the caller's question, and a file that is not must be left as it was.
  try {
    exec("PRAGMA foreign_keys = ON");
    Statement probe(db_, "SELECT count(*) FROM sqlite_master");
    probe.step();
  } catch (const std::runtime_error&) {  // SqlError, or fail()'s InputError for a damaged file
    const std::string msg = sqlite3_errmsg(db_);
    sqlite3_close(db_);
    db_ = nullptr;
    throw sdk::InputError(file.string() + ": not a usable SQLite database (" + msg + ")");
  }
}

void Database::use_wal() {
  Statement mode(db_, "PRAGMA journal_mode = WAL");
  mode.step();
  // NORMAL is durable in WAL mode up to the last checkpoint and loses no committed data on a process crash;
  // only a power loss can drop the last transactions.
  exec("PRAGMA synchronous = NORMAL");
}

Database::~Database() {
  if (db_) sqlite3_close_v2(db_);
}

void Database::exec(const std::string& sql) {
  char* err = nullptr;
  if (sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &err) != SQLITE_OK) {
    std::string msg = err ? err : "unknown error";
    sqlite3_free(err);
    const int code = sqlite3_errcode(db_) & 0xff;
    if (code == SQLITE_CORRUPT || code == SQLITE_NOTADB) fail(db_, "executing SQL");
    throw SqlError(msg + " (in: " + sql.substr(0, 80) + ")");
  }
}

std::int64_t Database::last_insert_id() const { return sqlite3_last_insert_rowid(db_); }
std::int64_t Database::changes() const { return sqlite3_changes64(db_); }

Transaction::Transaction(Database& db) : db_(db) { db_.exec("BEGIN IMMEDIATE"); }

Transaction::~Transaction() {
  if (!done_) {
    try {
      db_.exec("ROLLBACK");
    } catch (...) {
      // Nothing sensible to do in a destructor; SQLite rolls back on close anyway.
    }
  }
}

void Transaction::commit() {
  db_.exec("COMMIT");
  done_ = true;
}

}  // namespace ablate::store
