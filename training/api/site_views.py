"""The Site API (/api/site/...): what a real site's agent calls, with its site credential.

Every task endpoint checks that the task is the calling site's own (403 otherwise): the
credential says which site calls, never an id in the body. The ledger work (claim, record,
close the round exactly once) is the same as for simulated clients (training/services.py).
"""

import re

from django.http import FileResponse, HttpResponse, StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.exceptions import NotFound, PermissionDenied, ValidationError
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.throttling import ScopedRateThrottle
from rest_framework.views import APIView

from training import services, sites
from training.api.site_auth import IsSiteAgent, SiteCredentialAuthentication
from training.api.site_serializers import (
    ApprovalDecisionSerializer,
    ApprovalSerializer,
    ClaimSerializer,
    ClientFailureSerializer,
    ClientReportSerializer,
    EnrolmentSerializer,
    HeartbeatSerializer,
    IssuedCredentialSerializer,
    RecordedSerializer,
    SiteDatasetSerializer,
    SiteStateSerializer,
    UploadedSerializer,
)
from training.models import (
    ClientUpdate,
    ClientUpdateStatus,
    ExperimentApproval,
    RoundKind,
    SiteDataset,
    model_store,
)

# training.clients and training.federation (the engine, PyTorch) are imported by the views
# that use them, so that a web process starts without loading the engine.

TAG = ["site API"]
NOT_RUNNING = (
    "This task is not running: claim it first, or it already finished, or its round closed "
    "without it (nothing more to do)."
)
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
RANGE = re.compile(r"bytes=(\d*)-(\d*)")
STREAM_CHUNK_BYTES = 1 << 20


class SiteAgentView(APIView):
    authentication_classes = [SiteCredentialAuthentication]
    permission_classes = [IsSiteAgent]

    @property
    def site(self):
        return self.request.auth.site

    def own_update(self, client_update_id: int) -> ClientUpdate:
        """The site's own ledger row for a task: 404 if none, 403 if another site's."""
        from training import federation

        update = (
            ClientUpdate.objects.select_related("round", "site").filter(pk=client_update_id).first()
        )
        if update is None:
            raise NotFound("No such task.")
        if update.site_id != self.site.pk:
            raise PermissionDenied("This task belongs to another site.")
        update.round.experiment = federation.experiment_configuration(update.round.experiment_id)
        return update


class EnrolView(APIView):
    """Exchange a one-time enrolment token for the site's credential and broker user."""

    authentication_classes = []
    permission_classes = [AllowAny]
    throttle_classes = [ScopedRateThrottle]
    throttle_scope = "site-enrolment"

    @extend_schema(
        tags=TAG,
        request=EnrolmentSerializer,
        responses={201: IssuedCredentialSerializer, 400: OpenApiTypes.OBJECT},
    )
    def post(self, request):
        given = EnrolmentSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        devices = given.validated_data["devices"]
        try:
            issued = sites.enrol(
                given.validated_data["token"],
                agent_version=given.validated_data["agent_version"],
                devices=devices,
                hostname=given.validated_data.get("hostname", ""),
            )
        except sites.EnrolmentRefused as refused:
            raise ValidationError({"token": [str(refused)]}) from None
        except sites.SitesNotConfigured as missing:
            # How this server is set up, which its admin changes; not an outage that passes.
            return Response({"detail": str(missing)}, status=status.HTTP_409_CONFLICT)
        return Response(IssuedCredentialSerializer(issued).data, status=status.HTTP_201_CREATED)


class SiteStateView(SiteAgentView):
    @extend_schema(tags=TAG, responses=SiteStateSerializer)
    def get(self, request):
        return Response(SiteStateSerializer(self.site).data)


class HeartbeatView(SiteAgentView):
    @extend_schema(tags=TAG, request=HeartbeatSerializer, responses=SiteStateSerializer)
    def post(self, request):
        given = HeartbeatSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        sites.record_heartbeat(self.site, **given.validated_data)
        return Response(SiteStateSerializer(self.site).data)


class RotateCredentialView(SiteAgentView):
    @extend_schema(tags=TAG, request=None, responses=IssuedCredentialSerializer)
    def post(self, request):
        issued = sites.rotate_credential(request.auth)
        return Response(IssuedCredentialSerializer(issued).data)


class SiteDatasetListView(SiteAgentView):
    @extend_schema(tags=TAG, responses=SiteDatasetSerializer(many=True))
    def get(self, request):
        declared = SiteDataset.objects.filter(site=self.site).select_related("dataset")
        return Response(SiteDatasetSerializer(declared, many=True).data)


class SiteDatasetView(SiteAgentView):
    @extend_schema(
        tags=TAG,
        request=SiteDatasetSerializer,
        responses={
            200: SiteDatasetSerializer,
            201: SiteDatasetSerializer,
            409: OpenApiTypes.OBJECT,
        },
    )
    def put(self, request, name: str):
        given = SiteDatasetSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        try:
            declaration, created = sites.declare_dataset(self.site, name, given.validated_data)
        except sites.DeclarationConflict as conflict:
            return Response({"detail": str(conflict)}, status=status.HTTP_409_CONFLICT)
        return Response(
            SiteDatasetSerializer(declaration).data,
            status=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
        )

    @extend_schema(tags=TAG, responses={204: None, 404: OpenApiTypes.OBJECT})
    def delete(self, request, name: str):
        if not sites.withdraw_dataset(self.site, name):
            raise NotFound(f"This site declared no dataset named {name!r}.")
        return Response(status=status.HTTP_204_NO_CONTENT)


class ApprovalListView(SiteAgentView):
    @extend_schema(tags=TAG, responses=ApprovalSerializer(many=True))
    def get(self, request):
        approvals = ExperimentApproval.objects.filter(site=self.site).select_related(
            "experiment__owner", "experiment__dataset"
        )
        return Response(ApprovalSerializer(approvals, many=True).data)


class ApprovalDecisionView(SiteAgentView):
    @extend_schema(
        tags=TAG,
        request=ApprovalDecisionSerializer,
        responses={200: ApprovalSerializer, 404: OpenApiTypes.OBJECT, 409: OpenApiTypes.OBJECT},
    )
    def post(self, request, experiment_id: int):
        given = ApprovalDecisionSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        if not ExperimentApproval.objects.filter(site=self.site, experiment=experiment_id).exists():
            raise NotFound(f"Experiment {experiment_id} asked this site for no approval.")
        approval = services.decide_approval(
            experiment_id,
            self.site,
            approved=given.validated_data["decision"] == "approve",
            reason=given.validated_data.get("reason", ""),
        )
        return Response(ApprovalSerializer(approval).data)


class ClaimTaskView(SiteAgentView):
    @extend_schema(
        tags=TAG,
        request=ClaimSerializer,
        responses={
            200: OpenApiResponse(OpenApiTypes.OBJECT, description="The client task (JSON)."),
            403: OpenApiTypes.OBJECT,
            409: OpenApiTypes.OBJECT,
        },
    )
    def post(self, request, client_update_id: int):
        from training import clients, federation

        given = ClaimSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        own = self.own_update(client_update_id)
        claimed = services.claim_client_update(
            own.pk,
            given.validated_data["round"],
            self.site.pk,
            worker=given.validated_data.get("worker", "")[:255],
            task_id=own.task_id,
        )
        if claimed is None:
            return Response(
                {"detail": "This task needs no work: it already finished, or its round closed "
                 "without it."},
                status=status.HTTP_409_CONFLICT,
            )  # fmt: skip
        task = federation.client_task(claimed)
        return Response(
            {
                **task.to_json(),
                "upload_limit_bytes": clients.upload_limit_bytes(own.round.experiment),
            }
        )


class TaskWeightsView(SiteAgentView):
    @extend_schema(
        tags=TAG,
        parameters=[
            OpenApiParameter("Range", str, OpenApiParameter.HEADER, required=False),
            OpenApiParameter("If-None-Match", str, OpenApiParameter.HEADER, required=False),
        ],
        responses={
            (200, "application/octet-stream"): OpenApiResponse(
                OpenApiTypes.BINARY, description="The round's starting weights (safetensors)."
            ),
            (206, "application/octet-stream"): OpenApiResponse(OpenApiTypes.BINARY),
            304: None,
            403: OpenApiTypes.OBJECT,
            409: OpenApiTypes.OBJECT,
            416: OpenApiTypes.OBJECT,
        },
    )
    def get(self, request, client_update_id: int):
        from training import federation

        update = self.own_update(client_update_id)
        if update.status != ClientUpdateStatus.RUNNING:
            return Response({"detail": NOT_RUNNING}, status=status.HTTP_409_CONFLICT)
        name, sha256 = federation.starting_checkpoint(
            update.round.experiment_id, update.round.number
        )
        return weights_response(request, name, sha256)


class TaskPayloadView(SiteAgentView):
    @extend_schema(
        tags=TAG,
        summary="The strategy's payload for every client of the task's round",
        description="Tensors the strategy sends every client of a round (SCAFFOLD's server "
        "control variate), as safetensors; the task's payload_sha256 is their SHA-256. "
        "404 when the round has none (the task's payload_sha256 is empty).",
        parameters=[
            OpenApiParameter("Range", str, OpenApiParameter.HEADER, required=False),
            OpenApiParameter("If-None-Match", str, OpenApiParameter.HEADER, required=False),
        ],
        responses={
            (200, "application/octet-stream"): OpenApiResponse(
                OpenApiTypes.BINARY, description="The payload (safetensors)."
            ),
            (206, "application/octet-stream"): OpenApiResponse(OpenApiTypes.BINARY),
            304: None,
            403: OpenApiTypes.OBJECT,
            404: OpenApiTypes.OBJECT,
            409: OpenApiTypes.OBJECT,
            416: OpenApiTypes.OBJECT,
        },
    )
    def get(self, request, client_update_id: int):
        from training import federation

        update = self.own_update(client_update_id)
        if update.status != ClientUpdateStatus.RUNNING:
            return Response({"detail": NOT_RUNNING}, status=status.HTTP_409_CONFLICT)
        payload = federation.strategy_payload_file(update.round.experiment_id, update.round.number)
        if payload is None:
            raise NotFound("The strategy sends no payload in this round.")
        return weights_response(request, *payload)


class TaskEvaluationModelView(SiteAgentView):
    @extend_schema(
        tags=TAG,
        summary="A model that the task's cross-site evaluation names",
        description="For an evaluate task only: 'global' is the experiment's final global "
        "model, a site's slug that site's last successful update in the experiment. The "
        "X-Content-SHA256 header (also the ETag) is the file's SHA-256.",
        parameters=[
            OpenApiParameter("Range", str, OpenApiParameter.HEADER, required=False),
            OpenApiParameter("If-None-Match", str, OpenApiParameter.HEADER, required=False),
        ],
        responses={
            (200, "application/octet-stream"): OpenApiResponse(
                OpenApiTypes.BINARY, description="The model's weights (safetensors)."
            ),
            (206, "application/octet-stream"): OpenApiResponse(OpenApiTypes.BINARY),
            304: None,
            403: OpenApiTypes.OBJECT,
            404: OpenApiTypes.OBJECT,
            409: OpenApiTypes.OBJECT,
            416: OpenApiTypes.OBJECT,
        },
    )
    def get(self, request, client_update_id: int, label: str):
        from training import clients

        update = self.own_update(client_update_id)
        if update.status != ClientUpdateStatus.RUNNING:
            return Response({"detail": NOT_RUNNING}, status=status.HTTP_409_CONFLICT)
        named = clients.evaluation_models(update)
        if label not in named:
            raise NotFound(
                f"This task names no model {label!r} to evaluate"
                + (f"; it names {named}." if named else " (it is not an evaluate task).")
            )
        try:
            name, sha256 = clients.evaluation_model_file(
                update.round.experiment_id, update.round.number, label
            )
        except clients.EvaluationModelUnavailable as missing:
            raise NotFound(str(missing)) from None
        return weights_response(request, name, sha256)


def weights_response(request, name: str, sha256: str) -> HttpResponse:
    """A weights file with its hash as ETag, whole or from a byte offset (Range)."""
    etag = f'"{sha256}"'
    headers = {"ETag": etag, "X-Content-SHA256": sha256, "Accept-Ranges": "bytes"}
    if request.headers.get("If-None-Match") in (etag, sha256):
        return HttpResponse(status=status.HTTP_304_NOT_MODIFIED, headers=headers)
    storage = model_store()
    size = storage.size(name)
    wanted = request.headers.get("Range")
    if not wanted:
        response = FileResponse(storage.open(name, "rb"), content_type="application/octet-stream")
        for header, value in headers.items():
            response[header] = value
        return response
    matched = RANGE.fullmatch(wanted.strip())
    if matched is None or (matched.group(1) == "" and matched.group(2) == ""):
        return HttpResponse(
            b'{"detail": "Send one range, as bytes=START- or bytes=START-END."}',
            status=status.HTTP_416_REQUESTED_RANGE_NOT_SATISFIABLE,
            content_type="application/json",
            headers={**headers, "Content-Range": f"bytes */{size}"},
        )
    first, last = matched.groups()
    if first == "":  # the last N bytes
        start, end = max(size - int(last), 0), size - 1
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start > end or start >= size:
        return HttpResponse(
            b'{"detail": "The range lies outside the file."}',
            status=status.HTTP_416_REQUESTED_RANGE_NOT_SATISFIABLE,
            content_type="application/json",
            headers={**headers, "Content-Range": f"bytes */{size}"},
        )
    handle = storage.open(name, "rb")
    handle.seek(start)

    def chunks():
        remaining = end - start + 1
        with handle:
            while remaining > 0:
                chunk = handle.read(min(STREAM_CHUNK_BYTES, remaining))
                if not chunk:
                    return
                remaining -= len(chunk)
                yield chunk

    return StreamingHttpResponse(
        chunks(),
        status=status.HTTP_206_PARTIAL_CONTENT,
        content_type="application/octet-stream",
        headers={
            **headers,
            "Content-Range": f"bytes {start}-{end}/{size}",
            "Content-Length": str(end - start + 1),
        },
    )


class TaskUpdateView(SiteAgentView):
    @extend_schema(
        tags=TAG,
        request={"application/octet-stream": OpenApiTypes.BINARY},
        parameters=[
            OpenApiParameter(
                "X-Content-SHA256",
                str,
                OpenApiParameter.HEADER,
                required=True,
                description="SHA-256 of the body, in hex.",
            )
        ],
        responses={
            201: UploadedSerializer,
            400: OpenApiTypes.OBJECT,
            409: OpenApiTypes.OBJECT,
            411: OpenApiTypes.OBJECT,
            413: OpenApiTypes.OBJECT,
        },
    )
    def put(self, request, client_update_id: int):
        from training import clients

        update = self.own_update(client_update_id)
        if update.status != ClientUpdateStatus.RUNNING:
            return Response({"detail": NOT_RUNNING}, status=status.HTTP_409_CONFLICT)
        if update.round.kind == RoundKind.EVALUATE:
            return Response(
                {"detail": "An evaluate task sends no weights: post its evaluation to "
                 ".../result/."},
                status=status.HTTP_409_CONFLICT,
            )  # fmt: skip
        declared_sha256 = request.headers.get("X-Content-SHA256", "")
        if not SHA256_HEX.fullmatch(declared_sha256):
            return Response(
                {"detail": "Send the update's SHA-256 (64 hex digits) in X-Content-SHA256."},
                status=status.HTTP_400_BAD_REQUEST,
            )
        try:
            declared_size = int(request.headers.get("Content-Length", ""))
        except ValueError:
            return Response(
                {"detail": "Send the update's size in Content-Length."},
                status=status.HTTP_411_LENGTH_REQUIRED,
            )
        try:
            stored = clients.receive_update(
                update,
                request._request,
                declared_size=declared_size,
                declared_sha256=declared_sha256,
            )
        except clients.UpdateRefused as refused:
            # A bad file fails this client for the round; the others go on without it.
            services.record_client_result(update, error=f"Update refused: {refused}")
            return Response({"detail": str(refused)}, status=refused.status)
        if not clients.keep_uploaded_update(update, stored):
            return Response({"detail": NOT_RUNNING}, status=status.HTTP_409_CONFLICT)
        return Response(
            {"sha256": stored.sha256, "size_bytes": stored.size_bytes},
            status=status.HTTP_201_CREATED,
        )


class TaskResultView(SiteAgentView):
    @extend_schema(
        tags=TAG,
        request=ClientReportSerializer,
        responses={200: RecordedSerializer, 400: OpenApiTypes.OBJECT, 409: RecordedSerializer},
    )
    def post(self, request, client_update_id: int):
        from training import clients
        from training.fl.client import ClientReport

        given = ClientReportSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        update = self.own_update(client_update_id)
        if update.status != ClientUpdateStatus.RUNNING:
            return Response(
                {"recorded": False, "detail": NOT_RUNNING}, status=status.HTTP_409_CONFLICT
            )
        evaluating = update.round.kind == RoundKind.EVALUATE
        if evaluating and not given.validated_data.get("evaluation"):
            raise ValidationError(
                {"evaluation": ["An evaluate task reports its evaluation: model label to "
                                "metrics."]}
            )  # fmt: skip
        if not evaluating and not update.update_file:
            return Response(
                {"detail": "Upload the trained weights first (PUT .../update/)."},
                status=status.HTTP_400_BAD_REQUEST,
            )
        declared = (
            SiteDataset.objects.filter(site=self.site, dataset=update.round.experiment.dataset_id)
            .values_list("num_samples", flat=True)
            .first()
        )
        num_samples = given.validated_data["num_samples"]
        # Sample counts weigh the average: a site cannot claim more data than it declared.
        if declared is not None and num_samples > declared:
            raise ValidationError(
                {"num_samples": [f"{num_samples} exceeds the {declared} samples this site "
                                 "declared for the dataset; declare the dataset again."]}
            )  # fmt: skip
        report = ClientReport(
            num_samples=num_samples,
            metrics=given.validated_data["metrics"],
            extras=given.validated_data.get("extras") or {},
            evaluation=given.validated_data.get("evaluation") or {},
        )
        recorded = clients.record_remote_result(update, report)
        if not recorded:
            return Response(
                {"recorded": False, "detail": NOT_RUNNING}, status=status.HTTP_409_CONFLICT
            )
        return Response({"recorded": True})


class TaskFailureView(SiteAgentView):
    @extend_schema(
        tags=TAG,
        request=ClientFailureSerializer,
        responses={200: RecordedSerializer, 409: RecordedSerializer},
    )
    def post(self, request, client_update_id: int):
        given = ClientFailureSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        update = self.own_update(client_update_id)
        if update.status != ClientUpdateStatus.RUNNING:
            return Response(
                {"recorded": False, "detail": NOT_RUNNING}, status=status.HTTP_409_CONFLICT
            )
        recorded = services.record_client_result(
            update, error=f"Reported by the site: {given.validated_data['error']}"
        )
        return Response({"recorded": recorded})
