"""A plugin built out of tree against the installed SDK (find_package(AblateSdk)) is discovered by the runner
and used in a grid."""
import os
import shutil
import subprocess
import sys
import unittest

from ablate_testing import BUILD, SOURCE, TempDirTest, query, run, tiny_experiment


def torch_cmake_prefix():
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.utils.cmake_prefix_path)"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


class OutOfTreeTest(TempDirTest):
    def test_out_of_tree_plugin_in_a_grid(self):
        prefix = self.dir / "prefix"
        install = subprocess.run(["cmake", "--install", str(BUILD), "--prefix", str(prefix)], capture_output=True, text=True)
        self.assertEqual(install.returncode, 0, install.stderr)
        self.assertTrue((prefix / "lib" / "cmake" / "AblateSdk" / "AblateSdkConfig.cmake").exists())
        # Only the real plugins are installed, never the negative test fixtures.
        installed = sorted(p.name for p in (prefix / "lib" / "ablate" / "plugins").iterdir())
        self.assertFalse([p for p in installed if "fixture" in p], installed)

        plugin_build = self.dir / "plugin-build"
        configure = ["cmake", "-S", str(SOURCE / "examples" / "avgpool_projector"), "-B", str(plugin_build), "-G", "Ninja",
                     "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_PREFIX_PATH={prefix};{torch_cmake_prefix()}",
                     "-DTORCH_CUDA_ARCH_LIST=9.0"]
        if shutil.which("ccache"):
            configure.append("-DCMAKE_CXX_COMPILER_LAUNCHER=ccache")
        result = subprocess.run(configure, capture_output=True, text=True)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        result = subprocess.run(["cmake", "--build", str(plugin_build)], capture_output=True, text=True)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

        runner = prefix / "bin" / "runner"
        listed = run(["plugins", "--plugins", plugin_build], runner=runner)
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertRegex(listed.stdout, r"projector\s+avgpool\s+1\s+\S*libablate_avgpool_projector\.so")

        toml = self.write("oot.toml", tiny_experiment(
            "oot", steps=6, every=3,
            extra='[grid]\n"model.projector" = [{ plugin = "git" }, { plugin = "avgpool", pool = 2 }]\n'))
        db = self.dir / "results.db"
        done = run([toml, "--db", db, "--plugins", plugin_build], runner=runner)
        self.assertEqual(done.returncode, 0, done.stderr)
        rows = query(db, "SELECT label, status, image_tokens, plugins FROM runs ORDER BY cell_index")
        self.assertEqual([r[1] for r in rows], ["done", "done"])
        self.assertEqual(rows[0][2], 5)  # 4 patches + CLS
        self.assertEqual(rows[1][2], 3)  # pooled in pairs: ceil(5 / 2)
        self.assertIn("projector/avgpool@1", rows[1][3])
        self.assertEqual(query(db, "SELECT count(*) FROM steps s JOIN runs r ON r.id = s.run_id "
                                   "WHERE r.cell_index = 1 AND s.split = 'train'"), [(6,)])
        compare = run(["compare", "oot", "--db", db], runner=runner)
        self.assertIn("model.projector", compare.stdout)
        self.assertIn("avgpool(pool=2)", compare.stdout)


if __name__ == "__main__":
    unittest.main()
