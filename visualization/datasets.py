"""The datasets page (the user's datasets, each with its images) and the upload page.

The upload page's script sends the archive to POST /api/datasets/upload/ and shows its
progress; everything about the archive is checked there (training.api.uploads).
"""

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.shortcuts import render
from django.urls import reverse

from training.models import Dataset, Modality


@login_required
def dataset_list(request):
    datasets = Dataset.objects.visible_to(request.user).select_related("owner").order_by("name")
    return render(request, "visualization/datasets.html", {"datasets": datasets})


@login_required
def dataset_upload(request):
    context = {
        "modalities": Modality.choices,
        "default_modality": Modality.OTHER,
        "upload_url": reverse("dataset-upload"),
        "max_upload_mb": settings.FEDLENS_MAX_UPLOAD_MB,
    }
    return render(request, "visualization/dataset_upload.html", context)
