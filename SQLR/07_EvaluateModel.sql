-- EvaluateModel: accuracy, confusion, ROC/AUC and ranking quality of a model version (latest by default).
-- Conventions: see SQLR/04_FeaturizeImages.sql.
CREATE OR ALTER PROCEDURE dbo.EvaluateModel
    @model_version int = NULL,
    @seed int = 0,
    @evaluation_id int = NULL OUTPUT
AS
BEGIN
    SET NOCOUNT ON;
    SET XACT_ABORT ON;
    IF @seed IS NULL OR @seed < 0
        THROW 50041, N'EvaluateModel: seed must be 0 or more.', 1;
    SET @model_version = COALESCE(@model_version, (SELECT MAX(version) FROM dbo.models));
    IF @model_version IS NULL OR NOT EXISTS (SELECT 1 FROM dbo.models WHERE version = @model_version)
        THROW 50042, N'EvaluateModel: no such trained model; run TrainModel first.', 1;

    DECLARE @error nvarchar(4000), @backbone nvarchar(64), @classes nvarchar(max), @model_params nvarchar(max),
            @summary nvarchar(max);
    SELECT @backbone = backbone, @classes = classes, @model_params = params
    FROM dbo.models WHERE version = @model_version;
    CREATE TABLE #step (backbone nvarchar(64) NOT NULL, model_version int NOT NULL);
    INSERT INTO #step (backbone, model_version) VALUES (@backbone, @model_version);
    CREATE TABLE #figures (table_name nvarchar(32) NOT NULL, scope nvarchar(64) NOT NULL,
                           metric nvarchar(200) NOT NULL, class nvarchar(200) NOT NULL, value float NOT NULL);
    BEGIN TRY
        INSERT INTO #figures (table_name, scope, metric, class, value)
        EXEC sp_execute_external_script
            @language = N'Python',
            @script = N'
# output variables are set on every path (Known issues for Python and R)
summary = None
from image_similarity.contexts import inproc
with inproc.reported() as report:
    OutputDataSet, summary = inproc.evaluate_model(InputDataSet, backbone, classes, model_params, model_version,
                                                   seed)
error = report.error
',
            @input_data_1 = N'
SELECT i.id AS image_id, i.label, i.dhash, p.subset, CONVERT(varchar(max), f.vector, 2) AS data,
       NULL AS array_name, NULL AS dtype, NULL AS shape
FROM dbo.images AS i
JOIN dbo.splits AS p ON p.image_id = i.id
JOIN dbo.features AS f ON f.image_id = i.id
JOIN #step AS s ON f.backbone = s.backbone
UNION ALL
SELECT NULL, NULL, NULL, NULL, CONVERT(varchar(max), a.data, 2), a.name, a.dtype, a.shape
FROM dbo.model_arrays AS a
JOIN #step AS s ON a.version = s.model_version',
            @params = N'@backbone nvarchar(64), @classes nvarchar(max), @model_params nvarchar(max), @model_version int,
                        @seed int, @summary nvarchar(max) OUTPUT, @error nvarchar(4000) OUTPUT',
            @backbone = @backbone,
            @classes = @classes,
            @model_params = @model_params,
            @model_version = @model_version,
            @seed = @seed,
            @summary = @summary OUTPUT,
            @error = @error OUTPUT;
    END TRY
    BEGIN CATCH
        SET @error = ERROR_MESSAGE();
    END CATCH;
    IF @error IS NULL AND (NOT EXISTS (SELECT 1 FROM #figures) OR ISJSON(@summary) IS NULL OR ISJSON(@summary) = 0)
        SET @error = N'the engine returned no figures';
    IF @error IS NOT NULL
    BEGIN
        SET @error = CONCAT(N'EvaluateModel: ', @error);
        THROW 50043, @error, 1;
    END;

    BEGIN TRANSACTION;
    INSERT INTO dbo.evaluations (model_version, summary) VALUES (@model_version, @summary);
    SET @evaluation_id = CAST(SCOPE_IDENTITY() AS int);
    INSERT INTO dbo.evaluation_metrics (evaluation_id, scope, metric, class, value)
    SELECT @evaluation_id, scope, metric, class, value FROM #figures WHERE table_name = N'evaluation_metrics';
    INSERT INTO dbo.evaluation_confusion (evaluation_id, subset, true_label, predicted_label, count)
    SELECT @evaluation_id, scope, metric, class, CAST(value AS int)
    FROM #figures WHERE table_name = N'evaluation_confusion';
    COMMIT TRANSACTION;
    SELECT scope, metric, class, value FROM dbo.evaluation_metrics
    WHERE evaluation_id = @evaluation_id AND class = N'' ORDER BY scope, metric;
END;
GO
