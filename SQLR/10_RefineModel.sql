-- RefineModel (issue 14): fine-tune a pretrained backbone on the training split's labels (a validation part is
-- carved out of the training split; the test split is never read) and store it as the next version in
-- networks/network_arrays, named <backbone>_refined_<version>: a backbone name the other procedures accept like
-- any other. The weights are plain arrays (key, dtype, shape, bytes). Conventions: see SQLR/04_FeaturizeImages.sql
-- (XACT_ABORT ON, TRY around the external call, its one-line error THROWn, binary data as hexadecimal text).
-- One external call does every epoch, so an interrupted call starts again from the first epoch (the Python
-- client's `refine` and PostgreSQL's `refine_model` resume after the last finished epoch).
CREATE OR ALTER PROCEDURE dbo.RefineModel
    @backbone nvarchar(64) = N'efficientnet_lite0',
    @epochs int = NULL,
    @seed int = 0,
    @network nvarchar(128) = NULL OUTPUT
AS
BEGIN
    SET NOCOUNT ON;
    SET XACT_ABORT ON;
    IF @backbone IS NULL OR @backbone NOT IN (N'efficientnet_lite0', N'mobilenet_v2', N'resnet18', N'resnet50',
                                              N'resnet101')
        THROW 50101, N'RefineModel: backbone must be a pretrained network (efficientnet_lite0, mobilenet_v2, resnet18, resnet50, resnet101).', 1;
    IF @epochs IS NOT NULL AND (@epochs < 1 OR @epochs > 1000)
        THROW 50102, N'RefineModel: epochs must be from 1 to 1000, or NULL for the default.', 1;
    IF @seed IS NULL OR @seed < 0
        THROW 50103, N'RefineModel: seed must be 0 or more.', 1;
    IF NOT EXISTS (SELECT 1 FROM dbo.splits WHERE subset = 'train')
        THROW 50104, N'RefineModel: no training split; run PrepareData first.', 1;

    DECLARE @error nvarchar(4000), @network_params nvarchar(max), @metrics nvarchar(max), @rejected nvarchar(max),
            @version int;
    CREATE TABLE #weights ([key] nvarchar(200) NOT NULL, dtype nvarchar(16) NOT NULL, shape nvarchar(64) NOT NULL,
                           data varchar(max) NOT NULL);
    BEGIN TRY
        INSERT INTO #weights ([key], dtype, shape, data)
        EXEC sp_execute_external_script
            @language = N'Python',
            @script = N'
# output variables are set on every path (Known issues for Python and R)
network_params = metrics = rejected = None
from image_similarity.contexts import inproc
with inproc.reported() as report:
    OutputDataSet, network_params, metrics, rejected = inproc.refine_model(InputDataSet, backbone, epochs, seed)
error = report.error
',
            @input_data_1 = N'
SELECT i.id, i.name, i.label, CONVERT(varchar(max), i.data, 2) AS data
FROM dbo.images AS i
JOIN dbo.splits AS p ON p.image_id = i.id
WHERE p.subset = ''train''
ORDER BY i.id',
            @params = N'@backbone nvarchar(64), @epochs int, @seed int, @network_params nvarchar(max) OUTPUT,
                        @metrics nvarchar(max) OUTPUT, @rejected nvarchar(max) OUTPUT, @error nvarchar(4000) OUTPUT',
            @backbone = @backbone,
            @epochs = @epochs,
            @seed = @seed,
            @network_params = @network_params OUTPUT,
            @metrics = @metrics OUTPUT,
            @rejected = @rejected OUTPUT,
            @error = @error OUTPUT;
    END TRY
    BEGIN CATCH
        SET @error = ERROR_MESSAGE();
    END CATCH;
    IF @error IS NULL AND (NOT EXISTS (SELECT 1 FROM #weights) OR ISJSON(@network_params) IS NULL
                           OR ISJSON(@network_params) = 0 OR ISJSON(@metrics) IS NULL OR ISJSON(@metrics) = 0
                           OR ISJSON(@rejected) IS NULL OR ISJSON(@rejected) = 0)
        SET @error = N'the engine returned no network';
    IF @error IS NOT NULL
    BEGIN
        SET @error = CONCAT(N'RefineModel: ', @error);
        THROW 50105, @error, 1;
    END;

    BEGIN TRANSACTION;
    SELECT @version = COALESCE(MAX(version), 0) + 1 FROM dbo.networks WITH (UPDLOCK, HOLDLOCK)
    WHERE base = @backbone;
    SET @network = CONCAT(@backbone, N'_refined_', @version);
    INSERT INTO dbo.networks (name, base, version, status, params, metrics)
    VALUES (@network, @backbone, @version, 'ready', @network_params, @metrics);
    INSERT INTO dbo.network_arrays (network, kind, [key], dtype, shape, data)
    SELECT @network, 'weights', w.[key], w.dtype, w.shape, CONVERT(varbinary(max), w.data, 2) FROM #weights AS w;
    INSERT INTO dbo.rejected_files (name, label, stage, reason)
    SELECT s.name, s.label, N'refine', s.reason
    FROM (SELECT JSON_VALUE(j.value, N'$[0]') AS name, JSON_VALUE(j.value, N'$[1]') AS label,
                 JSON_VALUE(j.value, N'$[2]') AS reason
          FROM OPENJSON(@rejected) AS j) AS s
    WHERE NOT EXISTS (SELECT 1 FROM dbo.rejected_files AS r
                      WHERE r.name = s.name AND r.stage = N'refine' AND r.reason = s.reason);
    COMMIT TRANSACTION;
    SELECT @network AS network, @backbone AS base, @version AS version,
           JSON_VALUE(@metrics, N'$.best.epoch') AS best_epoch,
           JSON_VALUE(@metrics, N'$.best.val_accuracy') AS val_accuracy;
END;
GO
