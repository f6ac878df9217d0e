#pragma once
// HTML views of an experiment: the grid table, curves, what trained in each run and a sample gallery.
// `runner report` writes one self-contained file (images and curves as data: URIs, no script, no network);
// `runner serve` serves the same page, re-read from the database on every request.
// Every string that came from a model, a dataset, a TOML file or the database is escaped.

#include <string>

#include "report/runs.hpp"

namespace ablate::report {

std::string html_escape(const std::string& s);

struct PageOptions {
  std::size_t samples = 24;       ///< sample ids in the gallery (each shown across every run)
  std::string image_url;          ///< "": images inline as data: URIs; else this prefix + sha256 ("/image/")
  int refresh_seconds = 0;        ///< > 0: the page reloads itself (serve, while a grid runs)
  std::string back_link;          ///< serve: a link back to the index
  std::string database;           ///< shown in the header
};

std::string experiment_page(store::Store& db, const ExperimentView& view, const PageOptions& options);

}  // namespace ablate::report
