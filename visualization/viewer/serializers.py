"""What the viewer's API answers; these serializers only describe and shape output."""

from rest_framework import serializers

ARRAY_ORDER = "In array order: (slices,) rows, columns, like the dataset's image_shape."


class ViewerErrorSerializer(serializers.Serializer):
    detail = serializers.CharField(help_text="What went wrong and what to change.")


class ImageSummarySerializer(serializers.Serializer):
    index = serializers.IntegerField(help_text="The image's number in the dataset.")
    site = serializers.CharField(help_text='Acquisition site, or "all" without site data.')
    label = serializers.IntegerField(help_text="The true class label.")
    class_name = serializers.CharField()
    path = serializers.CharField(help_text="The file within the dataset folder, or .npz entry.")
    shape = serializers.ListField(
        child=serializers.IntegerField(),
        allow_null=True,
        help_text=f"{ARRAY_ORDER} Null when the file's header cannot be read.",
    )


class IntensitySerializer(serializers.Serializer):
    min = serializers.FloatField()
    max = serializers.FloatField()
    p1 = serializers.FloatField(help_text="1st percentile.")
    p99 = serializers.FloatField(help_text="99th percentile.")


class ImageDetailSerializer(ImageSummarySerializer):
    shape = serializers.ListField(child=serializers.IntegerField(), help_text=ARRAY_ORDER)
    channels = serializers.IntegerField(help_text="1 for grey images, 3 or 4 for colour.")
    spacing = serializers.ListField(
        child=serializers.FloatField(), help_text=f"Millimetres per pixel. {ARRAY_ORDER}"
    )
    num_slices = serializers.IntegerField(help_text="Axial slices; 1 for a 2D image.")
    slices_per_plane = serializers.DictField(
        child=serializers.IntegerField(), help_text="Slices of each plane the PNG can show."
    )
    intensity = IntensitySerializer(help_text="Stored intensities of the whole image.")


class ClassProbabilitySerializer(serializers.Serializer):
    label = serializers.IntegerField()
    name = serializers.CharField()
    probability = serializers.FloatField()


class PredictionSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    checkpoint = serializers.IntegerField()
    experiment = serializers.IntegerField()
    experiment_name = serializers.CharField()
    round = serializers.IntegerField(allow_null=True, help_text="Null for the initial weights.")
    true_label = serializers.IntegerField()
    true_class_name = serializers.CharField()
    predicted_label = serializers.IntegerField()
    predicted_class_name = serializers.CharField()
    probability = serializers.FloatField(help_text="The predicted class's probability.")
    correct = serializers.BooleanField()
    probabilities = ClassProbabilitySerializer(many=True, help_text="Softmax of every class.")


class ClassCountSerializer(serializers.Serializer):
    label = serializers.IntegerField()
    name = serializers.CharField()
    count = serializers.IntegerField()


class ShapeCountSerializer(serializers.Serializer):
    shape = serializers.ListField(child=serializers.IntegerField(), help_text=ARRAY_ORDER)
    count = serializers.IntegerField(help_text="Sampled images of this shape.")


class SpacingCountSerializer(serializers.Serializer):
    spacing = serializers.ListField(child=serializers.FloatField(), help_text=ARRAY_ORDER)
    count = serializers.IntegerField(help_text="Sampled images with this spacing.")


class ClassVolumeSerializer(serializers.Serializer):
    label = serializers.IntegerField()
    name = serializers.CharField()
    voxels = serializers.IntegerField(help_text="Voxels of this class in the sampled masks.")
    mm3 = serializers.FloatField(help_text="Their volume in mm³ (mm² for 2D images).")


class SiteStatisticsSerializer(serializers.Serializer):
    site = serializers.CharField()
    num_samples = serializers.IntegerField(help_text="Images at the site.")
    num_sampled = serializers.IntegerField(help_text="Images read for the intensity statistics.")
    num_unreadable = serializers.IntegerField(help_text="Sampled images that failed to read.")
    first_error = serializers.CharField(allow_blank=True)
    class_counts = ClassCountSerializer(many=True, help_text="Every image, not only the sample.")
    histogram = serializers.ListField(
        child=serializers.FloatField(),
        help_text="Fraction of the site's sampled pixels in each bin of the shared range.",
    )
    below_range = serializers.FloatField(help_text="Fraction of pixels below the range.")
    above_range = serializers.FloatField(help_text="Fraction of pixels above the range.")
    mean = serializers.FloatField()
    std = serializers.FloatField()
    shapes = ShapeCountSerializer(many=True)
    spacings = SpacingCountSerializer(many=True)
    flagged = serializers.BooleanField(help_text="Whether a flag names this site.")
    class_volumes = ClassVolumeSerializer(
        many=True,
        required=False,
        help_text="Segmentation datasets: each class's volume over the sampled masks.",
    )


class HistogramRangeSerializer(serializers.Serializer):
    low = serializers.FloatField(help_text="Dataset-wide 1st percentile.")
    high = serializers.FloatField(help_text="Dataset-wide 99th percentile.")
    bins = serializers.IntegerField()
    edges = serializers.ListField(child=serializers.FloatField())


class SiteFlagSerializer(serializers.Serializer):
    site = serializers.CharField(allow_null=True, help_text="Null when all sites differ.")
    kind = serializers.CharField(help_text="intensity, spacing, shape or class-balance.")
    message = serializers.CharField()


class UnavailableSiteSerializer(serializers.Serializer):
    site = serializers.CharField()
    reason = serializers.CharField()


class DatasetStatisticsSerializer(serializers.Serializer):
    dataset = serializers.IntegerField()
    sample_limit = serializers.IntegerField(help_text="Most images read per site.")
    class_names = serializers.ListField(child=serializers.CharField())
    histogram = HistogramRangeSerializer()
    sites = SiteStatisticsSerializer(many=True)
    flags = SiteFlagSerializer(many=True)
    unavailable_sites = UnavailableSiteSerializer(
        many=True, help_text="Sites whose data this server cannot read."
    )
