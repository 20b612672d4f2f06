-- PrepareData: the stratified train/test split (near-duplicates on one side), replacing the previous one only
-- when the new one covers every image. Conventions: see SQLR/04_FeaturizeImages.sql.
CREATE OR ALTER PROCEDURE dbo.PrepareData
    @test_fraction float = 0.25,
    @seed int = 0
AS
BEGIN
    SET NOCOUNT ON;
    SET XACT_ABORT ON;
    IF @test_fraction IS NULL OR @test_fraction <= 0 OR @test_fraction >= 1
        THROW 50021, N'PrepareData: test fraction must be between 0 and 1.', 1;
    IF @seed IS NULL OR @seed < 0
        THROW 50022, N'PrepareData: seed must be 0 or more.', 1;
    IF NOT EXISTS (SELECT 1 FROM dbo.images)
        THROW 50023, N'PrepareData: no images stored; load images first.', 1;
    IF NOT EXISTS (SELECT 1 FROM dbo.images WHERE label IS NOT NULL)
        THROW 50025, N'PrepareData: no labelled images stored; load some with labels first.', 1;

    DECLARE @error nvarchar(4000);
    CREATE TABLE #split (image_id int NOT NULL PRIMARY KEY, subset varchar(5) NOT NULL);
    BEGIN TRY
        INSERT INTO #split (image_id, subset)
        EXEC sp_execute_external_script
            @language = N'Python',
            @script = N'
from image_similarity.contexts import inproc
with inproc.reported() as report:
    OutputDataSet = inproc.prepare_data(InputDataSet, test_fraction, seed)
error = report.error
',
            @input_data_1 = N'SELECT i.id, i.name, i.label, i.sha256, i.dhash FROM dbo.images AS i
                WHERE i.label IS NOT NULL ORDER BY i.id',
            @params = N'@test_fraction float, @seed int, @error nvarchar(4000) OUTPUT',
            @test_fraction = @test_fraction,
            @seed = @seed,
            @error = @error OUTPUT;
    END TRY
    BEGIN CATCH
        SET @error = ERROR_MESSAGE();
    END CATCH;
    IF @error IS NULL AND ((SELECT COUNT(*) FROM #split) <> (SELECT COUNT(*) FROM dbo.images WHERE label IS NOT NULL)
                           OR EXISTS (SELECT 1 FROM dbo.images AS i WHERE i.label IS NOT NULL AND NOT EXISTS (
                               SELECT 1 FROM #split AS s WHERE s.image_id = i.id)))
        SET @error = N'the new split does not cover every labelled image';
    IF @error IS NOT NULL
    BEGIN
        SET @error = CONCAT(N'PrepareData: ', @error, N'; the stored split is unchanged');
        THROW 50024, @error, 1;
    END;

    BEGIN TRANSACTION;
    DELETE FROM dbo.splits;
    INSERT INTO dbo.splits (image_id, subset, seed, test_fraction)
    SELECT s.image_id, s.subset, @seed, @test_fraction FROM #split AS s;
    COMMIT TRANSACTION;
    -- issue 29: unlabelled images are left out of the split, and counted
    SELECT subset, COUNT(*) AS images FROM #split GROUP BY subset
    UNION ALL SELECT 'unlabelled', COUNT(*) FROM dbo.images WHERE label IS NULL HAVING COUNT(*) > 0
    ORDER BY subset;
END;
GO
