"""What SQL Server's Python runtime (Python 3.10, numpy 1.22.0, pandas 2.0.3: docs/sqlserver-setup.md) must do,
without torch and without conftest.py: .ci/run runs this file in that profile's virtualenv as well as in the main
one. The engine's bit counting, and the emulated sp_execute_external_script rules (tests/support/tsql.py) that the
procedures' data crosses, under the numpy and pandas the runtime has."""
from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
from support.tsql import Server, SqlError

from image_similarity.core.dedup import hamming, hamming_to, packed_hashes, popcount


def test_the_runtime_is_the_profile_ci_built():
    """In the profile's virtualenv (IMAGE_SIMILARITY_PROFILE=sqlserver) the versions are the documented ones."""
    import os

    if os.environ.get("IMAGE_SIMILARITY_PROFILE") == "sqlserver":
        assert sys.version_info[:2] == (3, 10) and np.__version__ == "1.22.0" and pd.__version__ == "2.0.3"
    assert popcount(np.array([0, 1, 2**64 - 1, 0x8000_0000_0000_0001], dtype=np.uint64)).tolist() == [0, 1, 64, 2]


def test_hamming_to_counts_bits_with_this_numpy():
    rng = np.random.default_rng(7)
    hashes = ["".join(rng.choice(list("0123456789abcdef"), 64)) for _ in range(50)]
    assert hamming_to(hashes[3], packed_hashes(hashes)).tolist() == [hamming(hashes[3], h) for h in hashes]


def run(script: str, params: str = "", arguments: str = "", declare: str = "",
        query: str = "SELECT id, x FROM dbo.t") -> tuple[list[pd.DataFrame], Server]:
    sql = Server()
    sql.run_script("CREATE TABLE dbo.t (id bigint NOT NULL, x float NULL, at datetime2 NULL);\nGO\n"
                   "INSERT INTO dbo.t (id, x) VALUES (9007199254740993, 0.5);")
    quoted = script.replace("'", "''")
    extra = f", @params = N'{params}', {arguments}" if params else ""
    results = sql.run_batch(f"{declare} EXEC sp_execute_external_script @language = N'Python', "
                            f"@script = N'{quoted}', @input_data_1 = N'{query}'{extra};")
    return results, sql


def test_bigint_parameters_arrive_as_float64():
    (out,), _ = run('import pandas as pd\nOutputDataSet = pd.DataFrame({"t": [type(n).__name__]})',
                    "@n bigint", "@n = 9007199254740993")
    assert out["t"].tolist() == ["float"]


@pytest.mark.parametrize("frame,message", [
    ('pd.DataFrame({"a": [None]})', "only None"),
    ('pd.DataFrame({"a": [1.5, float("nan")]})', "NaN"),
    ('pd.DataFrame({"a": pd.Series([1, None], dtype="Int64").astype(float)})', "NaN"),
])
def test_none_and_nan_in_output_data_sets_fail_the_call(frame, message):
    with pytest.raises(SqlError, match=f"^Msg 39004: .*Msg 39019: .*{message}"):
        run(f"import pandas as pd\nOutputDataSet = {frame}")


def test_bytes_come_back_null_and_text_and_numbers_as_they_are():
    (out,), _ = run('import pandas as pd\nOutputDataSet = pd.DataFrame({"b": [b"x"], "s": ["y"], "n": [2]})')
    assert out.iloc[0].tolist() == [None, "y", 2]


def test_an_output_variable_the_script_does_not_set_fails_the_call():
    with pytest.raises(SqlError, match="^Msg 39004: .*BxlServer: the script did not set the output variable e"):
        run("x = 1", "@e nvarchar(4000) OUTPUT", "@e = @e OUTPUT", "DECLARE @e nvarchar(4000);")
    _, sql = run("e = None", "@e nvarchar(4000) OUTPUT", "@e = @e OUTPUT", "DECLARE @e nvarchar(4000);")
    assert not sql.errors


@pytest.mark.parametrize("column", ["t.at", "CAST(x AS decimal(9, 2))", "CAST(x AS money)", "0.5", "CAST(id AS time)"])
def test_input_columns_of_a_type_python_does_not_map_fail_the_call(column):
    """sp_execute_external_script, Restrictions: datetime2, time, ... in the input query are an unsupported type
    error; numeric (a literal with a decimal point is one), decimal and money are not in the Python mapping. The
    emulation checked only parameters' types before. A bigint column arrives as float64, as the mapping says."""
    with pytest.raises(SqlError, match="^Msg 39004: Unsupported input data type"):
        run("OutputDataSet = InputDataSet", query=f"SELECT t.id, {column} AS c FROM dbo.t AS t")
    (out,), _ = run("OutputDataSet = InputDataSet", query="SELECT t.id, CONVERT(varchar(max), t.x) AS c, CAST(t.x AS "
                                                          "real) AS r, CAST(1 AS int) AS i FROM dbo.t AS t")
    assert out.iloc[0].tolist() == [9007199254740992.0, "0.5", 0.5, 1]  # bigint arrives as float64
