-- The engine's tables (Python/image_similarity/store/sqlite.py), in T-SQL types. Safe to re-run.
-- issue 29: a row is one item (one image of it): label NULL when unlabelled, item_key the user's key (unique when
-- given: a filtered index, as a UNIQUE constraint would allow one NULL), metadata a JSON object. The same bytes
-- may be stored under several keys, so sha256 is indexed, not unique. 02_Migrate.sql upgrades older tables.
IF OBJECT_ID(N'dbo.images', N'U') IS NULL
BEGIN
    CREATE TABLE dbo.images (
        id int IDENTITY (1, 1) NOT NULL PRIMARY KEY,
        name nvarchar(400) NOT NULL,
        label nvarchar(200) NULL,
        format nvarchar(16) NOT NULL,
        width int NOT NULL,
        height int NOT NULL,
        mode nvarchar(16) NOT NULL,
        size_bytes int NOT NULL,
        sha256 char(64) NOT NULL,
        dhash char(64) NOT NULL,
        data varbinary(max) NOT NULL,
        added_at datetime2 NOT NULL DEFAULT SYSUTCDATETIME(),
        item_key nvarchar(400) NULL,
        metadata nvarchar(max) NULL
    );
    CREATE INDEX ix_images_sha256 ON dbo.images (sha256);
    CREATE UNIQUE INDEX uq_images_item_key ON dbo.images (item_key) WHERE item_key IS NOT NULL;
END
GO
IF OBJECT_ID(N'dbo.rejected_files', N'U') IS NULL
    CREATE TABLE dbo.rejected_files (
        id int IDENTITY (1, 1) NOT NULL PRIMARY KEY,
        name nvarchar(400) NOT NULL,
        label nvarchar(200) NOT NULL,
        stage nvarchar(32) NOT NULL,
        reason nvarchar(400) NOT NULL,
        seen_at datetime2 NOT NULL DEFAULT SYSUTCDATETIME(),
        CONSTRAINT uq_rejected UNIQUE (name, stage, reason)
    );
GO
IF OBJECT_ID(N'dbo.features', N'U') IS NULL
    CREATE TABLE dbo.features (
        image_id int NOT NULL REFERENCES dbo.images (id) ON DELETE CASCADE,
        backbone nvarchar(64) NOT NULL,
        dim int NOT NULL,
        vector varbinary(max) NOT NULL,
        PRIMARY KEY (image_id, backbone)
    );
GO
IF OBJECT_ID(N'dbo.splits', N'U') IS NULL
    CREATE TABLE dbo.splits (
        image_id int NOT NULL PRIMARY KEY REFERENCES dbo.images (id) ON DELETE CASCADE,
        subset varchar(5) NOT NULL CHECK (subset IN ('train', 'test')),
        seed int NOT NULL,
        test_fraction float NOT NULL
    );
GO
IF OBJECT_ID(N'dbo.models', N'U') IS NULL
    CREATE TABLE dbo.models (
        version int IDENTITY (1, 1) NOT NULL PRIMARY KEY,
        backbone nvarchar(64) NOT NULL,
        classes nvarchar(max) NOT NULL,
        params nvarchar(max) NOT NULL,
        created_at datetime2 NOT NULL DEFAULT SYSUTCDATETIME()
    );
GO
IF OBJECT_ID(N'dbo.model_arrays', N'U') IS NULL
    CREATE TABLE dbo.model_arrays (
        version int NOT NULL REFERENCES dbo.models (version) ON DELETE CASCADE,
        name nvarchar(64) NOT NULL,
        dtype nvarchar(16) NOT NULL,
        shape nvarchar(64) NOT NULL,
        data varbinary(max) NOT NULL,
        PRIMARY KEY (version, name)
    );
GO
IF OBJECT_ID(N'dbo.evaluations', N'U') IS NULL
    CREATE TABLE dbo.evaluations (
        id int IDENTITY (1, 1) NOT NULL PRIMARY KEY,
        model_version int NOT NULL REFERENCES dbo.models (version),
        summary nvarchar(max) NOT NULL,
        created_at datetime2 NOT NULL DEFAULT SYSUTCDATETIME()
    );
GO
IF OBJECT_ID(N'dbo.evaluation_metrics', N'U') IS NULL
    CREATE TABLE dbo.evaluation_metrics (
        evaluation_id int NOT NULL REFERENCES dbo.evaluations (id) ON DELETE CASCADE,
        scope nvarchar(64) NOT NULL,
        metric nvarchar(64) NOT NULL,
        class nvarchar(200) NOT NULL,
        value float NOT NULL
    );
GO
IF OBJECT_ID(N'dbo.evaluation_confusion', N'U') IS NULL
    CREATE TABLE dbo.evaluation_confusion (
        evaluation_id int NOT NULL REFERENCES dbo.evaluations (id) ON DELETE CASCADE,
        subset varchar(5) NOT NULL,
        true_label nvarchar(200) NOT NULL,
        predicted_label nvarchar(200) NOT NULL,
        count int NOT NULL
    );
GO
IF OBJECT_ID(N'dbo.queries', N'U') IS NULL
    CREATE TABLE dbo.queries (
        id int IDENTITY (1, 1) NOT NULL PRIMARY KEY,
        query_name nvarchar(400) NOT NULL,
        query_sha256 char(64) NOT NULL,
        method nvarchar(16) NOT NULL,
        backbone nvarchar(64) NOT NULL,
        model_version int NULL,
        created_at datetime2 NOT NULL DEFAULT SYSUTCDATETIME()
    );
GO
IF OBJECT_ID(N'dbo.rankings', N'U') IS NULL
    CREATE TABLE dbo.rankings (
        query_id int NOT NULL REFERENCES dbo.queries (id) ON DELETE CASCADE,
        rank int NOT NULL,
        image_id int NOT NULL REFERENCES dbo.images (id),
        score float NOT NULL,
        PRIMARY KEY (query_id, rank)
    );
GO
-- issue 16: the numeric precision the network computed each feature vector at
IF OBJECT_ID(N'dbo.feature_precisions', N'U') IS NULL
    CREATE TABLE dbo.feature_precisions (
        image_id int NOT NULL,
        backbone nvarchar(64) NOT NULL,
        precision_used nvarchar(8) NOT NULL CHECK (precision_used IN (N'fp32', N'bf16', N'fp16')),
        PRIMARY KEY (image_id, backbone),
        FOREIGN KEY (image_id, backbone) REFERENCES dbo.features (image_id, backbone) ON DELETE CASCADE
    );
GO
-- issue 17: the top k most similar catalogue images of every catalogue image (ComputeNeighbors,
-- image-similarity neighbors); model_version 0 for l2 and cosine, which use no model.
IF OBJECT_ID(N'dbo.neighbors', N'U') IS NULL
    CREATE TABLE dbo.neighbors (
        image_id int NOT NULL REFERENCES dbo.images (id) ON DELETE CASCADE,
        backbone nvarchar(64) NOT NULL,
        method nvarchar(16) NOT NULL,
        model_version int NOT NULL,
        rank int NOT NULL,
        neighbor_id int NOT NULL REFERENCES dbo.images (id),
        score float NOT NULL,
        PRIMARY KEY (image_id, backbone, method, model_version, rank)
    );
GO
-- issue 14: refined networks (refine.py) and their arrays: the weights, and the resumable training state
-- (kinds 'state' and 'optimizer') while status is 'training'.
IF OBJECT_ID(N'dbo.networks', N'U') IS NULL
    CREATE TABLE dbo.networks (
        name nvarchar(128) NOT NULL PRIMARY KEY,
        base nvarchar(64) NOT NULL,
        version int NOT NULL,
        status varchar(8) NOT NULL CHECK (status IN ('training', 'ready')),
        params nvarchar(max) NOT NULL,
        metrics nvarchar(max) NOT NULL,
        created_at datetime2 NOT NULL DEFAULT SYSUTCDATETIME(),
        CONSTRAINT uq_network_version UNIQUE (base, version)
    );
GO
IF OBJECT_ID(N'dbo.network_arrays', N'U') IS NULL
    CREATE TABLE dbo.network_arrays (
        network nvarchar(128) NOT NULL REFERENCES dbo.networks (name) ON DELETE CASCADE,
        kind varchar(16) NOT NULL,
        [key] nvarchar(200) NOT NULL,
        dtype nvarchar(16) NOT NULL,
        shape nvarchar(64) NOT NULL,
        data varbinary(max) NOT NULL,
        PRIMARY KEY (network, kind, [key])
    );
GO
-- issue 29: the schema version each migration reached (store/migrations.py; 02_Migrate.sql on SQL Server).
IF OBJECT_ID(N'dbo.schema_version', N'U') IS NULL
    CREATE TABLE dbo.schema_version (
        version int NOT NULL PRIMARY KEY,
        applied_at datetime2 NOT NULL DEFAULT SYSUTCDATETIME()
    );
GO
IF NOT EXISTS (SELECT 1 FROM dbo.schema_version)
    INSERT INTO dbo.schema_version (version) VALUES (3);
GO
-- issue 28: what computed each feature vector: the runtime and a hash of the network's weights (docs/runtimes.md)
IF OBJECT_ID(N'dbo.feature_runtimes', N'U') IS NULL
    CREATE TABLE dbo.feature_runtimes (
        image_id int NOT NULL,
        backbone nvarchar(64) NOT NULL,
        runtime nvarchar(16) NOT NULL
            CONSTRAINT ck_feature_runtimes_runtime CHECK (runtime IN (N'torch', N'onnxruntime', N'openvino')),
        network_hash varchar(64) NOT NULL,
        PRIMARY KEY (image_id, backbone),
        FOREIGN KEY (image_id, backbone) REFERENCES dbo.features (image_id, backbone) ON DELETE CASCADE
    );
GO
