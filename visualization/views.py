from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from training.models import Experiment


@login_required
def home(request):
    experiments = (
        Experiment.objects.visible_to(request.user)
        .select_related("dataset", "owner")
        .order_by("-created_at")[:50]
    )
    return render(request, "visualization/home.html", {"experiments": experiments})
